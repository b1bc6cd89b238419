"""Image training augmentation: random resized crop + horizontal flip, then the serving normalisation."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from d2v_serve.preprocess import ImagePreprocessing


@dataclass(frozen=True)
class ImageAugment:
    scale: tuple[float, float] = (0.08, 1.0)  # crop area as a fraction of the image
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop width / height
    hflip: float = 0.5  # probability of a horizontal flip

    def __post_init__(self) -> None:
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"crop scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"crop ratio must satisfy 0 < min <= max, got {self.ratio}")
        if not 0 <= self.hflip <= 1:
            raise ValueError(f"hflip probability must be in [0, 1], got {self.hflip}")

    def __call__(self, img: Image.Image, pre: ImagePreprocessing, rng: np.random.Generator) -> np.ndarray:
        """RGB image -> float32 [3, S, S] with S = pre.image_size, normalised exactly as in serving."""
        left, top, w, h = random_resized_crop_box(img.width, img.height, self.scale, self.ratio, rng)
        size = pre.image_size
        img = img.resize((size, size), pre.resample, box=(left, top, left + w, top + h))
        if rng.random() < self.hflip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return pre.to_array(img)


def random_resized_crop_box(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """(left, top, w, h) of a crop covering a random fraction `scale` of the area with aspect ratio in `ratio`
    (torchvision's RandomResizedCrop: 10 tries, then the whole image clamped to the ratio range)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    w, h = max(1, min(w, width)), max(1, min(h, height))
    return (width - w) // 2, (height - h) // 2, w, h

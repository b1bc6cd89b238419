"""Image: decode with pillow (EXIF orientation, RGB), resize the shorter side, center crop, normalise to CHW float32."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputTooLarge, PreprocessError, check_config_keys, one_line

INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
# Formats decoded: the common ones only. Pillow reads dozens more (EPS even runs Ghostscript); each is attack surface.
IMAGE_FORMATS = ("BMP", "GIF", "JPEG", "PNG", "TIFF", "WEBP")  # JPEG covers multi-picture (MPO) files
# "center": resize the shorter side to resize_size, keep the aspect ratio, crop the middle image_size square.
# "none": resize straight to image_size x image_size (aspect not kept; what the HF BEiT processor does).
CROPS = ("center", "none")


@dataclass
class ImagePreprocessing:
    image_size: int = 224
    resize_size: int = 224
    crop: str = "center"
    interpolation: str = "bicubic"
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])

    def __post_init__(self) -> None:
        self.image_size, self.resize_size = int(self.image_size), int(self.resize_size)
        self.mean, self.std = [float(v) for v in self.mean], [float(v) for v in self.std]
        if self.image_size <= 0 or self.resize_size < self.image_size:
            raise ValueError(f"need 0 < image_size <= resize_size, got {self.image_size} and {self.resize_size}")
        if self.crop not in CROPS:
            raise ValueError(f"image crop must be one of {CROPS}, got {self.crop!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"image interpolation must be one of {sorted(INTERPOLATIONS)}, got {self.interpolation!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"image mean/std need 3 values each and std > 0, got {self.mean} / {self.std}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "image_size": self.image_size,
            "resize_size": self.resize_size,
            "crop": self.crop,
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImagePreprocessing:
        check_config_keys("image", d, cls.__dataclass_fields__)
        return cls(**d)

    @property
    def resample(self) -> Image.Resampling:
        return INTERPOLATIONS[self.interpolation]

    def prepare(self, img: Image.Image) -> np.ndarray:
        """RGB PIL image -> float32 [3, image_size, image_size], resized, cropped and normalised."""
        _check_size(img)
        if self.crop == "none":
            img = img.resize((self.image_size, self.image_size), self.resample)
        else:
            img = center_crop(resize_shorter(img, self.resize_size, self.resample), self.image_size)
        return self.to_array(img)

    def to_array(self, img: Image.Image) -> np.ndarray:
        """Last step, shared by serving and training augmentation: RGB -> /255 -> (x - mean) / std -> CHW float32."""
        _check_size(img)
        if img.mode != "RGB":
            img = img.convert("RGB")
        x = np.asarray(img, dtype=np.float32) * np.float32(1 / 255)
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1))


def resize_shorter(img: Image.Image, size: int, resample: Image.Resampling) -> Image.Image:
    """Resize so the shorter side is `size`, keeping the aspect ratio (torchvision's Resize(int) rounding)."""
    w, h = img.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    return img if (new_w, new_h) == (w, h) else img.resize((new_w, new_h), resample)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """Crop the middle size x size square (torchvision's CenterCrop offsets); the image must be at least that big."""
    w, h = img.size
    left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
    return img if (w, h) == (size, size) else img.crop((left, top, left + size, top + size))


def decode_image(data: bytes | str | Path, max_pixels: int | None = None) -> Image.Image:
    """Encoded image (bytes or a file path; BMP, GIF, JPEG, PNG, TIFF or WEBP) -> RGB PIL image with EXIF
    orientation applied. An animated image gives its first frame.

    With `max_pixels` the header's width x height is checked before any pixel is decoded (InputTooLarge). Raises
    PreprocessError with a one-line reason when the input is undecodable, too large or has zero size.
    """
    if isinstance(data, bytes | bytearray | memoryview):
        if not len(data):
            raise PreprocessError("image is empty (0 bytes)")
        source: Any = io.BytesIO(data)
    else:
        source = Path(data)
    try:
        with Image.open(source, formats=IMAGE_FORMATS) as opened:
            width, height = opened.size
            if max_pixels is not None and width * height > max_pixels:
                raise InputTooLarge(f"image is {width}x{height} = {width * height / 1e6:.1f} MP by its header, the "
                                    f"limit is {max_pixels / 1e6:g} MP", "max_image_pixels")
            opened.load()  # the current (first) frame only
            img = ImageOps.exif_transpose(opened).convert("RGB")
    except PreprocessError:
        raise
    except Image.DecompressionBombError:  # pillow's own limit, twice Image.MAX_IMAGE_PIXELS, checked at open()
        raise InputTooLarge(f"image is over {2 * Image.MAX_IMAGE_PIXELS / 1e6:.1f} MP by its header (pillow's "
                            "decompression-bomb limit)", "") from None
    except UnidentifiedImageError:  # its message carries the repr of the file object
        raise PreprocessError(f"cannot decode image: not a {', '.join(IMAGE_FORMATS)} file") from None
    # pillow signals a corrupt file with many exception types (OSError, SyntaxError, ValueError, struct.error, ...);
    # all of them mean "this input cannot be used".
    except Exception as exc:  # noqa: BLE001
        raise PreprocessError(f"cannot decode image: {one_line(exc)}") from None
    _check_size(img)
    return img


def _check_size(img: Image.Image) -> None:
    if img.width == 0 or img.height == 0:
        raise PreprocessError(f"image has zero size ({img.width}x{img.height})")

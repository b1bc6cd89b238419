"""Training data: datasets per modality and a deterministic, resumable stream of padded numpy batches.

    dataset = open_dataset("audio", "data/librispeech", config=DataConfig(max_samples=250_000))
    stream = BatchStream(dataset, batch_size=8, seed=1, max_batch_cost=1_400_000)
    for batch in stream.iterate(start_step=resumed_step):   # {"input_values": ..., "attention_mask": ...}
        ...

Batch `s` of a stream depends only on (dataset, stream options, seed, s): the epoch order and every random crop
or flip are drawn from generators seeded with (seed, epoch[, item]), so a resumed run continues the exact stream.
Items are decoded with d2v_serve.preprocess, the code the server runs. Torch-free: the trainer converts arrays.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from d2v_serve.preprocess import (
    AudioPreprocessing,
    ImagePreprocessing,
    PreprocessError,
    TextPreprocessing,
    collate,
    decode_audio,
    decode_image,
    normalize_waveform,
    preprocessing_from_dict,
    train_bpe_tokenizer,
)

from .augment import ImageAugment
from .data_sources import DataError, Sources, find_sources, read_documents

log = logging.getLogger(__name__)

_PLAN, _ITEM = 0, 1  # seed-sequence tags keeping the epoch order and per-item randomness independent


@dataclass
class DataConfig:
    """Dataset options (what one example is). Batch composition options live on BatchStream."""

    max_samples: int = 250_000  # audio: random crop to at most this many samples (16 kHz), fairseq's default
    min_samples: int = 0  # audio: drop files shorter than this (after resampling)
    augment: bool = True  # image: random resized crop + flip; False: the serving resize / center crop
    image_augment: ImageAugment = field(default_factory=ImageAugment)
    text_mode: str = "chunk"  # text: "chunk" splits long documents into max_length pieces; "truncate" keeps the first
    vocab_size: int = 8192  # text: BPE vocabulary when a tokenizer is trained on the corpus
    text_max_length: int = 512  # text: token limit incl. <s> </s> of a trained tokenizer (model positions - 2)
    min_frequency: int = 2  # text: BPE merge threshold

    def __post_init__(self) -> None:
        if self.max_samples <= 0 or self.min_samples < 0 or self.min_samples > self.max_samples:
            raise ValueError(f"need 0 <= min_samples <= max_samples, 0 < max_samples; got {self.min_samples}, "
                             f"{self.max_samples}")
        if self.text_mode not in ("chunk", "truncate"):
            raise ValueError(f"text_mode must be 'chunk' or 'truncate', got {self.text_mode!r}")


# ---------------------------------------------------------------------------------------------------- datasets


class AudioDataset:
    """Audio files -> mono 16 kHz, random crop to max_samples, normalised over the crop (what the model sees)."""

    modality = "audio"

    def __init__(self, files: list[Path], preprocessing: AudioPreprocessing, config: DataConfig) -> None:
        self.preprocessing = preprocessing
        self._resampler = dataclasses.replace(preprocessing, normalize=False)
        self.files: list[Path] = []
        lengths: list[int] = []
        self.skipped: list[tuple[Path, str]] = []
        for path in files:
            try:
                info = sf.info(str(path))
            except (sf.LibsndfileError, RuntimeError, OSError) as exc:
                self.skipped.append((path, f"unreadable: {' '.join(str(exc).split())}"))
                continue
            n = resampled_length(info.frames, info.samplerate, preprocessing.sample_rate)
            if n == 0 or n < config.min_samples:
                self.skipped.append((path, f"too short ({n} samples < min_samples {config.min_samples})"))
                continue
            self.files.append(path)
            lengths.append(min(n, config.max_samples))
        if self.skipped:
            log.warning("audio: skipped %d of %d files (first: %s: %s)", len(self.skipped), len(files),
                        *self.skipped[0])
        if not self.files:
            raise DataError(f"no usable audio files ({len(self.skipped)} skipped)")
        self.lengths = np.asarray(lengths, dtype=np.int64)  # planned (cropped) length of each item

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int, rng: np.random.Generator, length: int | None = None) -> np.ndarray:
        """Item `index` cropped at a random offset to `length` (default: its planned length) samples."""
        wave, rate = decode_audio(self.files[index])
        x = self._resampler.prepare(wave, rate)
        n = min(len(x), int(self.lengths[index] if length is None else length))
        start = int(rng.integers(0, len(x) - n + 1))
        x = x[start : start + n]
        return normalize_waveform(x) if self.preprocessing.normalize else x


class ImageDataset:
    """Image files -> augmented (or serving-preprocessed) float32 [3, S, S]."""

    modality = "image"
    lengths = None

    def __init__(self, files: list[Path], preprocessing: ImagePreprocessing, config: DataConfig) -> None:
        self.preprocessing = preprocessing
        self.files = list(files)
        self.augment = config.image_augment if config.augment else None

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int, rng: np.random.Generator, length: int | None = None) -> np.ndarray:
        img = decode_image(self.files[index])
        return self.augment(img, self.preprocessing, rng) if self.augment else self.preprocessing.prepare(img)


class TextDataset:
    """Documents -> token pieces of at most max_length ids, each wrapped in <s> ... </s> like serving's prepare."""

    modality = "text"

    def __init__(self, documents: Iterable[str], preprocessing: TextPreprocessing, config: DataConfig) -> None:
        self.preprocessing = preprocessing
        body = preprocessing.max_length - 2
        pieces: list[np.ndarray] = []
        batch: list[str] = []
        for doc in itertools.chain(documents, [None]):
            if doc is not None:
                batch.append(doc)
            if batch and (doc is None or len(batch) == 4096):
                for enc in preprocessing.tokenizer.encode_batch(batch, add_special_tokens=False):
                    ids = np.asarray(enc.ids, dtype=np.int32)
                    starts = range(0, len(ids), body) if config.text_mode == "chunk" else [0]
                    pieces.extend(ids[s : s + body] for s in starts if len(ids[s : s + body]))
                batch = []
        if not pieces:
            raise DataError("no text documents found (blank lines are skipped)")
        self.lengths = np.asarray([len(p) + 2 for p in pieces], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths - 2)])
        self.tokens = np.concatenate(pieces)

    def __len__(self) -> int:
        return len(self.lengths)

    def load(self, index: int, rng: np.random.Generator, length: int | None = None) -> np.ndarray:
        pre = self.preprocessing
        body = self.tokens[self.offsets[index] : self.offsets[index + 1]].astype(np.int64)
        return np.concatenate([[pre.bos_id], body, [pre.eos_id]]).astype(np.int64)


Dataset = AudioDataset | ImageDataset | TextDataset


def open_dataset(
    modality: str,
    data: str | Path | list[str | Path],
    preprocessing: AudioPreprocessing | ImagePreprocessing | TextPreprocessing | dict[str, Any] | None = None,
    config: DataConfig | None = None,
) -> Dataset:
    """Find the data (directory / manifest / files) and build the dataset. Without `preprocessing`: audio and image
    use the defaults; text trains a byte-level BPE tokenizer on the corpus (config.vocab_size)."""
    config = config or DataConfig()
    sources = find_sources(modality, data)
    if isinstance(preprocessing, dict):
        preprocessing = preprocessing_from_dict(modality, preprocessing)
    if modality == "audio":
        return AudioDataset(sources.files, preprocessing or AudioPreprocessing(), config)
    if modality == "image":
        return ImageDataset(sources.files, preprocessing or ImagePreprocessing(), config)
    if preprocessing is None:
        preprocessing = build_text_preprocessing(sources, config.vocab_size, config.text_max_length,
                                                 config.min_frequency)
    return TextDataset(iter_documents(sources), preprocessing, config)


def iter_documents(sources: Sources) -> Iterator[str]:
    """Inline documents first, then each file's non-blank lines."""
    yield from (d for d in sources.documents if d.strip())
    for path in sources.files:
        yield from read_documents(path)


def build_text_preprocessing(
    data: Sources | str | Path | list[str | Path], vocab_size: int, max_length: int = 512, min_frequency: int = 2
) -> TextPreprocessing:
    """Train the RoBERTa-style BPE tokenizer on a corpus (same discovery rules as `--data`)."""
    sources = data if isinstance(data, Sources) else find_sources("text", data)
    return train_bpe_tokenizer(iter_documents(sources), vocab_size, min_frequency=min_frequency, max_length=max_length)


def resampled_length(frames: int, rate: int, target_rate: int) -> int:
    """Samples soxr produces when resampling `frames` from `rate` to `target_rate` (round half up)."""
    return frames if rate == target_rate else (2 * frames * target_rate + rate) // (2 * rate)


# ---------------------------------------------------------------------------------------------------- batching


def plan_epoch(
    lengths: np.ndarray | None,
    num_items: int,
    batch_size: int,
    rng: np.random.Generator,
    max_batch_cost: int | None = None,
    bucket_batches: int = 50,
) -> list[np.ndarray]:
    """One epoch's batches of item indices. Items are shuffled; with lengths and bucket_batches > 0, each shuffled
    group of bucket_batches * batch_size items is sorted by length so batches hold similar lengths, then the
    batches themselves are shuffled. A batch closes at batch_size items or when len(batch) * longest would pass
    max_batch_cost (padded samples / tokens)."""
    order = rng.permutation(num_items)
    if lengths is None or bucket_batches <= 0:
        groups = [order]
    else:
        size = bucket_batches * batch_size
        groups = [g[np.argsort(-lengths[g], kind="stable")] for g in np.split(order, range(size, num_items, size))]
    batches: list[np.ndarray] = []
    for group in groups:
        start, longest = 0, 0
        for pos, idx in enumerate(group):
            item_len = 0 if lengths is None else int(lengths[idx])
            count = pos - start
            over_cost = max_batch_cost is not None and (count + 1) * max(longest, item_len) > max_batch_cost
            if count and (count == batch_size or over_cost):
                batches.append(group[start:pos])
                start, longest = pos, 0
            longest = max(longest, item_len)
        if start < len(group):
            batches.append(group[start:])
    if lengths is not None and bucket_batches > 0:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


class BatchStream:
    """An endless, reproducible sequence of batches over epochs. Step s is the s-th batch since the start; with
    world_size > 1 rank r reads global batches s * world_size + r."""

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seed: int = 0,
        max_batch_cost: int | None = None,
        bucket_batches: int = 50,
        pad_audio: bool = True,
        num_workers: int = 0,
        prefetch: int = 2,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        longest = 0 if dataset.lengths is None else int(dataset.lengths.max())
        if max_batch_cost is not None and max_batch_cost < longest:
            raise ValueError(f"max_batch_cost {max_batch_cost} is below the longest item ({longest})")
        self.dataset = dataset
        self.batch_size, self.seed, self.max_batch_cost = batch_size, seed, max_batch_cost
        self.bucket_batches, self.pad_audio = bucket_batches, pad_audio
        self.num_workers, self.prefetch = num_workers, prefetch
        self._epoch_sizes: list[int] = []
        self._plans: dict[int, list[np.ndarray]] = {}

    @property
    def pad_id(self) -> int:
        pre = self.dataset.preprocessing
        return pre.pad_id if isinstance(pre, TextPreprocessing) else 1

    def epoch_plan(self, epoch: int) -> list[np.ndarray]:
        if epoch not in self._plans:
            if len(self._plans) >= 2:
                self._plans.pop(min(self._plans))
            rng = np.random.default_rng([self.seed, epoch, _PLAN])
            self._plans[epoch] = plan_epoch(self.dataset.lengths, len(self.dataset), self.batch_size, rng,
                                            self.max_batch_cost, self.bucket_batches)
        return self._plans[epoch]

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, batch index within the epoch) of global batch `step`."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch = 0
        while True:
            if epoch == len(self._epoch_sizes):
                self._epoch_sizes.append(self._epoch_size(epoch))
            if step < self._epoch_sizes[epoch]:
                return epoch, step
            step -= self._epoch_sizes[epoch]
            epoch += 1

    def _epoch_size(self, epoch: int) -> int:
        if self.max_batch_cost is None:  # only batch_size closes batches; bucket groups are multiples of it
            return -(-len(self.dataset) // self.batch_size)
        return len(self.epoch_plan(epoch))

    def indices(self, step: int) -> np.ndarray:
        epoch, i = self.locate(step)
        return self.epoch_plan(epoch)[i]

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """Global batch `step`, loaded on the calling thread."""
        return self._collate([self._load(*job) for job in self._jobs(step)])

    def iterate(self, start_step: int = 0, rank: int = 0, world_size: int = 1) -> Iterator[dict[str, np.ndarray]]:
        """Batches start_step, start_step + 1, ... (endless) for this rank; num_workers threads decode ahead."""
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        steps = (s * world_size + rank for s in itertools.count(start_step))
        if self.num_workers <= 0:
            for step in steps:
                yield self.batch(step)
            return
        pool = ThreadPoolExecutor(self.num_workers, thread_name_prefix="d2v-data")
        pending: deque[list[Future[np.ndarray | None]]] = deque()
        try:
            for step in steps:
                while len(pending) <= self.prefetch:
                    jobs = self._jobs(step + len(pending) * world_size)
                    pending.append([pool.submit(self._load, *job) for job in jobs])
                yield self._collate([f.result() for f in pending.popleft()])
        finally:
            for futures in pending:
                for f in futures:
                    f.cancel()
            pool.shutdown(wait=True, cancel_futures=True)

    def _jobs(self, step: int) -> list[tuple[int, int, int | None]]:
        epoch, i = self.locate(step)
        idx = self.epoch_plan(epoch)[i]
        length = None
        if self.dataset.modality == "audio" and not self.pad_audio:
            length = int(self.dataset.lengths[idx].min())  # crop all to the shortest: no padding (fairseq's way)
        return [(int(j), epoch, length) for j in idx]

    def _load(self, index: int, epoch: int, length: int | None) -> np.ndarray | None:
        rng = np.random.default_rng([self.seed, epoch, _ITEM, index])
        try:
            return self.dataset.load(index, rng, length)
        except PreprocessError as exc:  # a corrupt file fails the same way every time: drop it, stay deterministic
            log.warning("%s: skipped item %s: %s", self.dataset.modality, _name(self.dataset, index), exc)
            return None

    def _collate(self, items: list[np.ndarray | None]) -> dict[str, np.ndarray]:
        good = [x for x in items if x is not None]
        if not good:
            raise DataError("every item of a batch failed to load (see the warnings above)")
        if self.dataset.modality == "audio" and not self.pad_audio:
            shortest = min(len(x) for x in good)  # a file shorter than its header said
            good = [x[:shortest] for x in good]
        return collate(self.dataset.modality, good, pad_id=self.pad_id)


def make_batches(
    modality: str,
    data: str | Path | list[str | Path] | Dataset,
    preprocessing: AudioPreprocessing | ImagePreprocessing | TextPreprocessing | dict[str, Any] | None = None,
    *,
    batch_size: int,
    seed: int = 0,
    start_step: int = 0,
    config: DataConfig | None = None,
    **stream_options: Any,
) -> Iterator[dict[str, np.ndarray]]:
    """Shortcut: open_dataset + BatchStream(...).iterate(start_step). Text without `preprocessing` trains a
    tokenizer you cannot see from here: use open_dataset / build_text_preprocessing when you need to save it."""
    dataset = data if isinstance(data, AudioDataset | ImageDataset | TextDataset) else open_dataset(
        modality, data, preprocessing, config)
    if dataset.modality != modality:
        raise ValueError(f"dataset is {dataset.modality}, asked for {modality}")
    return BatchStream(dataset, batch_size, seed, **stream_options).iterate(start_step)


def _name(dataset: Dataset, index: int) -> str:
    files = getattr(dataset, "files", None)
    return str(files[index]) if files is not None else f"#{index}"

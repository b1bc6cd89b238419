"""d2v.training.data: discovery, per-modality datasets, deterministic resumable batching, augmentation, tokenizer."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
from PIL import Image

from d2v.training.augment import ImageAugment, random_resized_crop_box
from d2v.training.data import (
    BatchStream,
    DataConfig,
    build_text_preprocessing,
    make_batches,
    open_dataset,
    plan_epoch,
    resampled_length,
)
from d2v.training.data_sources import DataError, find_sources
from d2v_serve.preprocess import AudioPreprocessing, ImagePreprocessing, decode_audio

WORDS = ["data", "vector", "speech", "image", "token", "teacher", "student", "mask", "target", "layer", "encoder"]


def write_audio(path: Path, seconds: float, rate: int, seed: int) -> np.ndarray:
    x = (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * rate))).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, x, rate)
    return x


def write_image(path: Path, w: int, h: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def documents(n: int, seed: int = 0, max_words: int = 40) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(1, max_words))) for _ in range(n)]


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("audio")
    rates = [16000, 44100, 8000, 22050]
    for i in range(16):
        rate = rates[i % 4]
        write_audio(root / f"spk{i % 3}" / f"{i}.{'wav' if i % 2 else 'flac'}", 0.2 + 0.1 * i, rate, seed=i)
    (root / "README.md").write_text("not audio")
    return root


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    for i in range(10):
        write_image(root / f"c{i % 2}" / f"{i}.{['png', 'jpg', 'webp'][i % 3]}", 40 + 7 * i, 60 - 2 * i, seed=i)
    return root


def batches(stream_or_iter, n: int) -> list[dict[str, np.ndarray]]:
    it = stream_or_iter.iterate() if isinstance(stream_or_iter, BatchStream) else stream_or_iter
    return [b for _, b in zip(range(n), it, strict=False)]


def assert_same(a: list[dict[str, np.ndarray]], b: list[dict[str, np.ndarray]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


# ------------------------------------------------------------------------------------------- discovery


def test_directory_discovery_is_recursive_and_by_extension(audio_dir, image_dir, tmp_path):
    files = find_sources("audio", audio_dir).files
    assert len(files) == 16 and all(p.suffix in (".wav", ".flac") for p in files) and files == sorted(files)
    assert len(find_sources("image", image_dir).files) == 10
    write_audio(tmp_path / "UPPER.WAV", 0.1, 16000, 0)
    assert find_sources("audio", tmp_path).files == [tmp_path / "UPPER.WAV"]
    with pytest.raises(DataError, match="no image data found"):
        find_sources("image", audio_dir)
    with pytest.raises(DataError, match="no such file or directory"):
        find_sources("audio", tmp_path / "nope")


def test_plain_manifest_relative_to_its_folder(tmp_path):
    for name in ("a.wav", "b.flac", "c.wav"):
        write_audio(tmp_path / "data" / name, 0.1, 16000, 0)
    manifest = tmp_path / "lists" / "train.tsv"
    manifest.parent.mkdir()
    # relative entries resolve against the manifest's folder, absolute ones stay, a TSV second column is ignored,
    # blank lines and comments are skipped
    absolute = tmp_path / "data" / "c.wav"
    manifest.write_text(f"# comment\n\n../data/b.flac\n../data/a.wav\t1600\n{absolute}\n")
    got = find_sources("audio", manifest).files
    assert [p.resolve() for p in got] == [tmp_path / "data" / n for n in ("b.flac", "a.wav", "c.wav")]
    manifest.write_text("../data/a.wav\nmissing.wav\n")
    with pytest.raises(DataError, match=r"train.tsv:2: .*missing.wav: no such file"):
        find_sources("audio", manifest)


def test_jsonl_manifests(image_dir, tmp_path):
    files = find_sources("image", image_dir).files
    (tmp_path / "img").symlink_to(image_dir)
    manifest = tmp_path / "images.jsonl"
    manifest.write_text("\n".join(json.dumps({"path": str(Path("img") / p.relative_to(image_dir)), "label": 3})
                                  for p in files[:4]))
    got = find_sources("image", manifest).files
    assert [p.resolve() for p in got] == [p.resolve() for p in files[:4]]
    corpus = tmp_path / "more.txt"
    corpus.write_text("a file document\n\nsecond one\n")
    text_manifest = tmp_path / "text.jsonl"
    text_manifest.write_text('{"text": "inline document one"}\n{"text": "inline two"}\n{"path": "more.txt"}\n')
    sources = find_sources("text", text_manifest)
    assert sources.documents == ["inline document one", "inline two"] and sources.files == [corpus]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"path": 3}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: .*\"path\""):
        find_sources("image", bad)
    bad.write_text('{"path": \n')
    with pytest.raises(DataError, match="invalid JSON"):
        find_sources("image", bad)


def test_text_txt_is_corpus_or_manifest(tmp_path):
    (tmp_path / "a.txt").write_text("doc one\ndoc two\n")
    (tmp_path / "b.txt").write_text("doc three\n")
    assert find_sources("text", tmp_path / "a.txt").files == [tmp_path / "a.txt"]  # a corpus file
    (tmp_path / "list.txt").write_text("a.txt\nb.txt\n")
    assert find_sources("text", tmp_path / "list.txt").files == [tmp_path / "a.txt", tmp_path / "b.txt"]


# ------------------------------------------------------------------------------------------- batching plan


def test_plan_covers_each_item_once_and_respects_caps():
    lengths = np.random.default_rng(0).integers(1_000, 250_000, size=500)
    plan = plan_epoch(lengths, 500, batch_size=16, rng=np.random.default_rng(1), max_batch_cost=1_400_000)
    assert sorted(np.concatenate(plan).tolist()) == list(range(500))
    assert all(1 <= len(b) <= 16 and len(b) * lengths[b].max() <= 1_400_000 for b in plan)
    image_plan = plan_epoch(None, 10, batch_size=4, rng=np.random.default_rng(1))
    assert [len(b) for b in image_plan] == [4, 4, 2]
    for bucket_batches in (0, 3, 50):  # without a cost cap an epoch has ceil(n / batch_size) batches
        rng = np.random.default_rng(2)
        assert len(plan_epoch(lengths, 500, 16, rng, bucket_batches=bucket_batches)) == 32


def test_similar_length_batching_reduces_padding():
    lengths = np.random.default_rng(0).integers(1_000, 250_000, size=2000)

    def padding_fraction(bucket_batches: int) -> float:
        plan = plan_epoch(lengths, len(lengths), 8, np.random.default_rng(5), bucket_batches=bucket_batches)
        padded = sum(len(b) * lengths[b].max() for b in plan)
        return 1 - lengths.sum() / padded

    random_order, bucketed = padding_fraction(0), padding_fraction(50)
    assert random_order > 0.3 and bucketed < 0.05, (random_order, bucketed)
    assert padding_fraction(50) == bucketed  # same rng seed, same plan


# ------------------------------------------------------------------------------------------- audio


@pytest.mark.parametrize("rate", [8000, 11025, 22050, 32000, 44100, 48000])
def test_resampled_length_matches_soxr(rate):
    for n in (1, 2, 3, 441, 1000, 12345, 44101):
        assert resampled_length(n, rate, 16000) == len(soxr.resample(np.zeros(n, np.float32), rate, 16000)), n


def test_audio_crops_and_lengths(audio_dir):
    ds = open_dataset("audio", audio_dir, config=DataConfig(max_samples=8000))
    assert len(ds) == 16 and ds.lengths.max() == 8000
    raw = AudioPreprocessing(normalize=False)
    for i in range(len(ds)):
        full = raw.prepare(*decode_audio(ds.files[i]))
        assert ds.lengths[i] == min(len(full), 8000)
        item = ds.load(i, np.random.default_rng(i))
        assert item.dtype == np.float32 and len(item) == ds.lengths[i]
        assert abs(item.mean()) < 1e-4 and abs(item.std() - 1) < 1e-3  # normalised over the crop
    # the crop is a contiguous window of the resampled file, at a random offset
    ds_raw = open_dataset("audio", audio_dir, AudioPreprocessing(normalize=False), DataConfig(max_samples=8000))
    longest = int(np.argmax([len(raw.prepare(*decode_audio(f))) for f in ds_raw.files]))
    full = raw.prepare(*decode_audio(ds_raw.files[longest]))
    starts = set()
    for seed in range(5):
        crop = ds_raw.load(longest, np.random.default_rng(seed))
        start = int(np.flatnonzero(np.isclose(full, crop[0]))[0])
        np.testing.assert_array_equal(full[start : start + 8000], crop)
        starts.add(start)
    assert len(starts) > 1


def test_audio_min_length_and_unreadable_files(audio_dir, tmp_path, caplog):
    ds = open_dataset("audio", audio_dir, config=DataConfig(min_samples=16000))
    assert len(ds) == len([f for f in ds.files if sf.info(str(f)).duration >= 1.0]) < 16
    assert ds.lengths.min() >= 16000
    write_audio(tmp_path / "ok.wav", 0.5, 16000, 0)
    (tmp_path / "broken.wav").write_bytes(b"RIFF not really")
    with caplog.at_level(logging.WARNING):
        ds = open_dataset("audio", tmp_path)
    assert [p.name for p in ds.files] == ["ok.wav"] and ds.skipped[0][0].name == "broken.wav"
    assert "skipped 1 of 2" in caplog.text
    with pytest.raises(DataError, match="no usable audio"):
        open_dataset("audio", [tmp_path / "broken.wav"])


def test_audio_batches_deterministic_resumable_and_padded(audio_dir):
    ds = open_dataset("audio", audio_dir, config=DataConfig(max_samples=8000))
    stream = BatchStream(ds, batch_size=4, seed=7, max_batch_cost=24000, bucket_batches=2)
    first = batches(stream, 12)  # more than one epoch
    for b in first:
        assert b["input_values"].dtype == np.float32 and b["attention_mask"].dtype == np.int64
        assert b["input_values"].size <= 24000
        assert (b["input_values"][b["attention_mask"] == 0] == 0).all()
    assert_same(first, batches(BatchStream(ds, batch_size=4, seed=7, max_batch_cost=24000, bucket_batches=2), 12))
    assert_same(first[5:], batches(stream.iterate(start_step=5), 7))  # resume from a step
    threaded = BatchStream(ds, batch_size=4, seed=7, max_batch_cost=24000, bucket_batches=2, num_workers=3)
    assert_same(first[3:], batches(threaded.iterate(start_step=3), 9))
    other = batches(BatchStream(ds, batch_size=4, seed=8, max_batch_cost=24000, bucket_batches=2), 12)
    assert any(a["input_values"].shape != b["input_values"].shape or not np.array_equal(a["input_values"],
               b["input_values"]) for a, b in zip(first, other, strict=True))
    # two ranks split the global stream between them
    rank0 = batches(stream.iterate(start_step=1, rank=0, world_size=2), 3)
    rank1 = batches(stream.iterate(start_step=1, rank=1, world_size=2), 3)
    assert_same(rank0, [stream.batch(s) for s in (2, 4, 6)])
    assert_same(rank1, [stream.batch(s) for s in (3, 5, 7)])


def test_audio_without_padding_crops_to_shortest(audio_dir):
    ds = open_dataset("audio", audio_dir, config=DataConfig(max_samples=8000))
    for b in batches(BatchStream(ds, batch_size=4, seed=0, pad_audio=False), 6):
        assert b["attention_mask"].all()
    via_shortcut = make_batches("audio", ds, batch_size=4, seed=0, start_step=2, pad_audio=False)
    assert_same(batches(via_shortcut, 2), [BatchStream(ds, 4, 0, pad_audio=False).batch(s) for s in (2, 3)])


# ------------------------------------------------------------------------------------------- image


def test_random_resized_crop_box_bounds():
    rng = np.random.default_rng(0)
    for _ in range(300):
        w, h = int(rng.integers(1, 300)), int(rng.integers(1, 300))
        left, top, cw, ch = random_resized_crop_box(w, h, (0.08, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= left and 0 <= top and 1 <= cw and 1 <= ch and left + cw <= w and top + ch <= h
    left, top, cw, ch = random_resized_crop_box(200, 100, (1.0, 1.0), (1.0, 1.0), rng)  # falls back to center
    assert (left, top, cw, ch) == (50, 0, 100, 100)


def test_image_augmentation_shape_dtype_determinism(image_dir):
    pre = ImagePreprocessing(image_size=32, resize_size=32)
    ds = open_dataset("image", image_dir, pre)
    a = ds.load(3, np.random.default_rng(1))
    assert a.shape == (3, 32, 32) and a.dtype == np.float32
    assert a.min() >= -1 - 1e-6 and a.max() <= 1 + 1e-6  # mean = std = 0.5 maps [0, 255] to [-1, 1]
    np.testing.assert_array_equal(a, ds.load(3, np.random.default_rng(1)))
    assert not np.array_equal(a, ds.load(3, np.random.default_rng(2)))
    stream = BatchStream(ds, batch_size=4, seed=3)
    first = batches(stream, 5)
    assert [b["pixel_values"].shape for b in first] == [(4, 3, 32, 32), (4, 3, 32, 32), (2, 3, 32, 32),
                                                        (4, 3, 32, 32), (4, 3, 32, 32)]
    assert_same(first[2:], batches(stream.iterate(start_step=2), 3))
    assert_same(first, batches(BatchStream(ds, batch_size=4, seed=3, num_workers=2), 5))


def test_augmentation_reuses_serving_normalisation(tmp_path):
    write_image(tmp_path / "sq.png", 48, 48, seed=0)
    pre = ImagePreprocessing(image_size=48, resize_size=48, mean=[0.4, 0.5, 0.6], std=[0.2, 0.3, 0.4])
    img = Image.open(tmp_path / "sq.png").convert("RGB")
    whole_flipped = ImageAugment(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=1.0)
    out = whole_flipped(img, pre, np.random.default_rng(0))
    np.testing.assert_allclose(out, pre.prepare(img)[:, :, ::-1], atol=1e-6)
    no_aug = open_dataset("image", tmp_path, pre, DataConfig(augment=False))
    np.testing.assert_array_equal(no_aug.load(0, np.random.default_rng(0)), pre.prepare(img))


def test_corrupt_image_is_skipped_with_a_warning(tmp_path, caplog):
    write_image(tmp_path / "a.png", 20, 20, seed=0)
    (tmp_path / "b.png").write_bytes(b"not a png")
    ds = open_dataset("image", tmp_path, ImagePreprocessing(image_size=16, resize_size=16))
    with caplog.at_level(logging.WARNING):
        batch = BatchStream(ds, batch_size=2, seed=0).batch(0)
    assert batch["pixel_values"].shape == (1, 3, 16, 16) and "b.png" in caplog.text
    with pytest.raises(DataError, match="every item"):
        BatchStream(open_dataset("image", [tmp_path / "b.png"]), batch_size=1).batch(0)


# ------------------------------------------------------------------------------------------- text


def test_tokenizer_training_on_corpus(tmp_path):
    (tmp_path / "c.txt").write_text("\n".join(documents(300)) + "\n\n   \n")
    pre = build_text_preprocessing(tmp_path, vocab_size=400, max_length=24)
    again = build_text_preprocessing(tmp_path / "c.txt", vocab_size=400, max_length=24)
    assert pre.tokenizer_json == again.tokenizer_json  # deterministic
    tok = pre.tokenizer
    assert [tok.token_to_id(t) for t in ("<s>", "<pad>", "</s>", "<unk>")] == [0, 1, 2, 3]
    assert pre.mask_id == pre.vocab_size - 1 and pre.max_length == 24
    assert tok.token_to_id("Ġteacher") is not None  # frequent words became tokens
    ds = open_dataset("text", tmp_path, config=DataConfig(vocab_size=400, text_max_length=24))
    assert ds.preprocessing.tokenizer_json == pre.tokenizer_json


def test_text_chunking_truncation_and_padding(tmp_path):
    docs = documents(50, seed=1, max_words=80)
    (tmp_path / "c.txt").write_text("\n\n".join(docs))
    pre = build_text_preprocessing(tmp_path, vocab_size=300, max_length=16)
    full = [pre.tokenizer.encode(d, add_special_tokens=False).ids for d in docs]
    chunked = open_dataset("text", tmp_path, pre, DataConfig(text_mode="chunk"))
    items = [chunked.load(i, np.random.default_rng(0)) for i in range(len(chunked))]
    assert all(len(x) <= 16 and x[0] == 0 and x[-1] == 2 and x.dtype == np.int64 for x in items)
    assert np.concatenate([x[1:-1] for x in items]).tolist() == sum(full, [])  # nothing lost, order kept
    assert len(chunked) == sum(-(-len(f) // 14) for f in full)
    truncated = open_dataset("text", tmp_path, pre, DataConfig(text_mode="truncate"))
    assert len(truncated) == 50
    for i, f in enumerate(full):
        np.testing.assert_array_equal(truncated.load(i, np.random.default_rng(0)), pre.prepare(docs[i]))
        assert len(pre.prepare(docs[i])) == min(len(f) + 2, 16)
    stream = BatchStream(chunked, batch_size=8, seed=0, max_batch_cost=64)
    for b in batches(stream, 10):
        ids, mask = b["input_ids"], b["attention_mask"]
        assert ids.dtype == np.int64 and mask.dtype == np.int64 and ids.size <= 64
        assert (ids[mask == 0] == pre.pad_id).all() and (ids[:, 0] == 0).all()
    assert_same(batches(stream.iterate(start_step=4), 3), batches(stream, 7)[4:])


def test_text_jsonl_inline_documents(tmp_path):
    manifest = tmp_path / "docs.jsonl"
    manifest.write_text("\n".join(json.dumps({"text": d}) for d in documents(100, seed=2)))
    ds = open_dataset("text", manifest, config=DataConfig(vocab_size=280, text_max_length=512))
    assert len(ds) == 100
    batch = next(make_batches("text", ds, batch_size=100, seed=0))
    assert batch["input_ids"].shape[0] == 100 and batch["attention_mask"].sum() == ds.lengths.sum()


def test_stream_option_errors(audio_dir):
    ds = open_dataset("audio", audio_dir, config=DataConfig(max_samples=8000))
    with pytest.raises(ValueError, match="below the longest item"):
        BatchStream(ds, batch_size=4, max_batch_cost=4000)
    with pytest.raises(ValueError, match="rank"):
        next(BatchStream(ds, batch_size=4).iterate(rank=2, world_size=2))
    with pytest.raises(ValueError, match="min_samples"):
        DataConfig(min_samples=10, max_samples=5)
    with pytest.raises(ValueError, match="dataset is audio"):
        make_batches("text", ds, batch_size=2)


def test_text_corpus_with_long_lines_is_not_mistaken_for_a_manifest(tmp_path):
    from d2v.training.data_sources import find_sources

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("word " * 200 + "\nanother document\n", encoding="utf-8")
    assert find_sources("text", corpus).files == [corpus]  # a corpus file, not a list of paths

"""d2v_serve.preprocess: real encoded files made here, parity with the transformers processors, error cases."""

from __future__ import annotations

import dataclasses
import io
import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
from PIL import Image
from tokenizers import AddedToken

from d2v_serve.preprocess import (
    AudioPreprocessing,
    ImagePreprocessing,
    InputTooLong,
    PreprocessError,
    TextPreprocessing,
    audio_frames,
    collate,
    decode_audio,
    decode_image,
    pcm_to_waveform,
    preprocessing_from_dict,
    tokenizer_from_hf_files,
    train_bpe_tokenizer,
)

BASE_CONV = [[512, 10, 5]] + [[512, 3, 2]] * 4 + [[512, 2, 2]] * 2


def sine(freq: float, rate: int, seconds: float = 1.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def encode_audio(x: np.ndarray, rate: int, fmt: str, subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def peak_freq(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[spectrum.argmax()])


def encode_image(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def random_image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    # smooth content (a blurred noise field) so lossy codecs and resampling behave like on photos
    small = rng.integers(0, 256, size=(max(h // 8, 2), max(w // 8, 2), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR)


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    syllables = ["da", "ta", "vec", "to", "ken", "ize", "spe", "ech", "im", "age", "lo", "rem", "ip", "sum", "é", "ß"]
    words = ["".join(rng.choice(syllables, size=rng.integers(1, 4))) for _ in range(300)]
    return [" ".join(rng.choice(words, size=rng.integers(3, 20))) for _ in range(n)]


# ---------------------------------------------------------------- audio


@pytest.mark.parametrize(
    ("fmt", "subtype", "atol"), [("WAV", "PCM_16", 1e-4), ("WAV", "FLOAT", 0), ("FLAC", None, 1e-4)]
)
def test_decode_lossless_formats(tmp_path, fmt, subtype, atol):
    x = sine(440, 16000, 0.5)
    data = encode_audio(x, 16000, fmt, subtype)
    wave, rate = decode_audio(data)
    assert rate == 16000 and wave.dtype == np.float32 and wave.shape == x.shape
    np.testing.assert_allclose(wave, x, atol=atol + 1e-7)
    path = tmp_path / f"a.{fmt.lower()}"
    path.write_bytes(data)
    wave_from_path, _ = decode_audio(path)
    np.testing.assert_array_equal(wave_from_path, wave)
    wave_from_str, _ = decode_audio(str(path))
    np.testing.assert_array_equal(wave_from_str, wave)


def test_decode_int16_pcm_scaling():
    ints = np.array([0, 16384, -16384, 32767, -32768], dtype=np.int16)
    wave, _ = decode_audio(encode_audio(ints, 8000, "WAV", "PCM_16"))
    np.testing.assert_array_equal(wave, ints.astype(np.float32) / 32768)


def test_decode_ogg_vorbis_keeps_frequency():
    x = sine(1000, 16000, 1.0)
    wave, rate = decode_audio(encode_audio(x, 16000, "OGG", "VORBIS"))
    assert rate == 16000 and abs(len(wave) - len(x)) <= 1024
    assert abs(peak_freq(wave, rate) - 1000) < 5


def test_stereo_is_averaged_to_mono():
    left, right = sine(440, 16000, 0.25), sine(880, 16000, 0.25, amp=0.25)
    wave, _ = decode_audio(encode_audio(np.stack([left, right], axis=1), 16000, "WAV", "FLOAT"))
    np.testing.assert_allclose(wave, (left + right) / 2, atol=1e-7)


@pytest.mark.parametrize(("rate", "freq"), [(44100, 440.0), (8000, 1000.0), (48000, 3000.0)])
def test_resample_to_16k_keeps_length_and_frequency(rate, freq):
    wave, got_rate = decode_audio(encode_audio(sine(freq, rate, 1.0), rate, "WAV", "FLOAT"))
    out = AudioPreprocessing(normalize=False).prepare(wave, got_rate)
    assert out.dtype == np.float32 and out.ndim == 1
    assert len(out) == 16000
    assert abs(peak_freq(out, 16000) - freq) < 2
    # HQ resampling keeps the amplitude of an in-band sine (away from the edges)
    assert abs(np.abs(out[1000:-1000]).max() - 0.5) < 0.01


def test_no_resample_at_target_rate_and_normalisation():
    x = 0.1 * sine(300, 16000, 0.5) + 0.3
    out = AudioPreprocessing().prepare(x, 16000)
    assert abs(out.mean()) < 1e-5 and abs(out.std() - 1) < 1e-4
    np.testing.assert_allclose(AudioPreprocessing(normalize=False).prepare(x, 16000), x)


def test_audio_normalisation_matches_wav2vec2_feature_extractor():
    from transformers import Wav2Vec2FeatureExtractor

    rng = np.random.default_rng(0)
    waves = [(0.3 * rng.standard_normal(n) + 0.05).astype(np.float32) for n in (16000, 9000, 12345)]
    fe = Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True, return_attention_mask=True
    )
    ref = fe(waves, sampling_rate=16000, padding=True, return_tensors="np")
    cfg = AudioPreprocessing()
    ours = collate("audio", [cfg.prepare(w, 16000) for w in waves])
    assert ours["input_values"].dtype == np.float32 and ours["attention_mask"].dtype == np.int64
    np.testing.assert_array_equal(ours["attention_mask"], ref["attention_mask"])
    np.testing.assert_allclose(ours["input_values"], ref["input_values"], atol=1e-5)


def test_pcm_to_waveform():
    ints = np.array([[0, 100], [16384, -16384], [-32768, 32767]], dtype="<i2")
    np.testing.assert_array_equal(
        pcm_to_waveform(ints.tobytes(), "int16", channels=2), ints.astype(np.float32).mean(axis=1) / 32768
    )
    floats = np.array([0.25, -0.5, 1.0], dtype="<f4")
    np.testing.assert_array_equal(pcm_to_waveform(floats.tobytes(), "float32"), floats)
    with pytest.raises(PreprocessError, match="multiple of 4"):
        pcm_to_waveform(b"\x00" * 6, "int16", channels=2)
    with pytest.raises(PreprocessError, match="empty"):
        pcm_to_waveform(b"", "float32")
    with pytest.raises(PreprocessError, match="dtype"):
        pcm_to_waveform(b"\x00\x00", "int8")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "empty"),
        (b"this is not audio at all" * 10, "cannot decode audio"),
        (encode_audio(sine(440, 16000), 16000, "WAV", "PCM_16")[:30], "cannot decode audio"),
        (encode_audio(np.zeros(0, np.float32), 16000, "WAV", "PCM_16"), "no samples"),
    ],
    ids=["empty", "garbage", "truncated-header", "zero-frames"],
)
def test_decode_audio_errors_are_one_line(data, match):
    with pytest.raises(PreprocessError, match=match) as info:
        decode_audio(data)
    assert "\n" not in str(info.value) and "BytesIO" not in str(info.value)


def test_decode_audio_missing_file(tmp_path):
    with pytest.raises(PreprocessError, match="cannot decode audio"):
        decode_audio(tmp_path / "missing.wav")


def test_prepare_audio_rejects_bad_waveforms():
    cfg = AudioPreprocessing()
    with pytest.raises(PreprocessError, match="empty"):
        cfg.prepare(np.zeros(0, np.float32), 16000)
    with pytest.raises(PreprocessError, match="1-D"):
        cfg.prepare(np.zeros((10, 2), np.float32), 16000)
    with pytest.raises(PreprocessError, match="NaN"):
        cfg.prepare(np.array([0.1, np.nan], np.float32), 16000)
    with pytest.raises(PreprocessError, match="sample rate"):
        cfg.prepare(np.ones(10, np.float32), 0)


def test_audio_frames():
    assert audio_frames(400, BASE_CONV) == 1
    assert audio_frames(399, BASE_CONV) == 0
    assert audio_frames(16000, BASE_CONV) == 49
    assert audio_frames(250000, BASE_CONV) == 781  # (250000 - 400) // 320 + 1
    np.testing.assert_array_equal(audio_frames(np.array([0, 400, 16000]), BASE_CONV), [0, 1, 49])


# ---------------------------------------------------------------- image


@pytest.mark.parametrize(("fmt", "kwargs"), [("PNG", {}), ("JPEG", {"quality": 95}), ("WEBP", {"lossless": True})])
def test_decode_image_formats(tmp_path, fmt, kwargs):
    img = random_image(64, 48)
    data = encode_image(img, fmt, **kwargs)
    out = decode_image(data)
    assert out.mode == "RGB" and out.size == (64, 48)
    diff = np.abs(np.asarray(out, np.int16) - np.asarray(img, np.int16))
    assert diff.mean() < (4 if fmt == "JPEG" else 1e-9)
    path = tmp_path / f"x.{fmt.lower()}"
    path.write_bytes(data)
    assert decode_image(path).size == (64, 48)


def test_decode_image_applies_exif_orientation():
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)  # left half red
    arr[:, 20:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    data = encode_image(Image.fromarray(arr), "JPEG", quality=95, exif=exif.tobytes())
    out = np.asarray(decode_image(data))
    assert out.shape == (40, 20, 3)  # portrait after rotation
    top, bottom = out[5:15].reshape(-1, 3).mean(0), out[25:35].reshape(-1, 3).mean(0)
    assert top[0] > 200 and top[2] < 60  # clockwise rotation moves the left (red) half to the top
    assert bottom[2] > 200 and bottom[0] < 60


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16"])
def test_decode_image_converts_to_rgb(mode):
    img = random_image(16, 16).convert("RGBA" if mode == "RGBA" else "L")
    if mode == "P":
        img = random_image(16, 16).convert("P")
    if mode == "I;16":
        img = Image.fromarray(np.full((16, 16), 1000, dtype=np.uint16))
    assert decode_image(encode_image(img, "PNG")).mode == "RGB"


def test_image_matches_beit_image_processor_on_square_input():
    from transformers import BeitImageProcessorPil
    from transformers.image_utils import PILImageResampling

    ref_proc = BeitImageProcessorPil(
        do_resize=True,
        size={"height": 224, "width": 224},
        resample=PILImageResampling.BICUBIC,
        do_center_crop=False,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_reduce_labels=False,
    )
    cfg = ImagePreprocessing()
    for size in (300, 224, 100):
        img = decode_image(encode_image(random_image(size, size, seed=size), "PNG"))
        ref = ref_proc(img, return_tensors="np")["pixel_values"][0]
        ours = cfg.prepare(img)
        assert ours.shape == (3, 224, 224) and ours.dtype == np.float32
        np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_image_crop_none_matches_beit_processor_on_non_square_input():
    from transformers import BeitImageProcessorPil

    ref_proc = BeitImageProcessorPil(size={"height": 64, "width": 64}, resample=3, do_center_crop=False,
                                     image_mean=[0.5] * 3, image_std=[0.5] * 3)
    img = random_image(150, 90, seed=3)
    ours = ImagePreprocessing(image_size=64, resize_size=64, crop="none").prepare(img)
    np.testing.assert_allclose(ours, ref_proc(img, return_tensors="np")["pixel_values"][0], atol=1e-5)


def test_image_resize_shorter_side_then_center_crop():
    arr = np.zeros((224, 448, 3), np.uint8)
    arr[:, 112:336] = 255  # the middle square is white, the sides black
    out = ImagePreprocessing().prepare(Image.fromarray(arr))
    assert out.shape == (3, 224, 224)
    np.testing.assert_allclose(out[:, :, 3:-3], 1.0, atol=1e-6)  # white -> (1 - 0.5) / 0.5
    # resize 256 then crop 224, with other statistics: output stays image_size and uses mean/std
    cfg = ImagePreprocessing(image_size=224, resize_size=256, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    out = cfg.prepare(Image.new("RGB", (400, 300), (0, 0, 0)))
    assert out.shape == (3, 224, 224)
    np.testing.assert_allclose(out[:, 0, 0], -np.array(cfg.mean) / np.array(cfg.std), rtol=1e-6)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "empty"),
        (b"\x89PNG\r\n\x1a\n" + b"garbage" * 20, "cannot decode image"),
        (b"definitely not an image", "cannot decode image"),
        (encode_image(random_image(64, 64), "PNG")[:200], "cannot decode image"),
    ],
    ids=["empty", "bad-png", "garbage", "truncated"],
)
def test_decode_image_errors_are_one_line(data, match):
    with pytest.raises(PreprocessError, match=match) as info:
        decode_image(data)
    assert "\n" not in str(info.value)


def test_image_errors_zero_size_and_bomb(monkeypatch, tmp_path):
    with pytest.raises(PreprocessError, match="zero size"):
        ImagePreprocessing().prepare(Image.new("RGB", (0, 5)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(PreprocessError, match="decompression-bomb limit"):
        decode_image(encode_image(Image.new("RGB", (64, 64)), "PNG"))
    with pytest.raises(PreprocessError, match="cannot decode image"):
        decode_image(tmp_path / "missing.png")


# ---------------------------------------------------------------- text


@pytest.fixture(scope="module")
def text_cfg() -> TextPreprocessing:
    return train_bpe_tokenizer(corpus(), vocab_size=400, min_frequency=2, max_length=64)


def test_train_bpe_tokenizer_ids(text_cfg):
    tok = text_cfg.tokenizer
    assert [tok.token_to_id(t) for t in ("<s>", "<pad>", "</s>", "<unk>")] == [0, 1, 2, 3]
    assert text_cfg.vocab_size == 400 and text_cfg.mask_id == 399 == tok.token_to_id("<mask>")
    assert (text_cfg.bos_id, text_cfg.pad_id, text_cfg.eos_id) == (0, 1, 2)
    ids = text_cfg.prepare("datavec token")
    assert ids.dtype == np.int64 and ids[0] == 0 and ids[-1] == 2 and len(ids) >= 4
    assert tok.decode(ids.tolist()) == "datavec token"
    # no prefix space, like RoBERTa: a leading space changes the first token
    assert text_cfg.prepare(" datavec")[1] != text_cfg.prepare("datavec")[1]
    # byte-level: any unicode round-trips without <unk>
    ids = text_cfg.prepare("naïve 日本 🙂")
    assert 3 not in ids.tolist() and tok.decode(ids.tolist()) == "naïve 日本 🙂"
    # <mask> is one token and takes the space before it
    ids = text_cfg.prepare("datavec <mask> token").tolist()
    assert ids.count(text_cfg.mask_id) == 1


def test_train_bpe_tokenizer_rejects_tiny_vocab():
    with pytest.raises(ValueError, match="at least 261"):
        train_bpe_tokenizer(["a b c"], vocab_size=100)


def test_text_truncation(text_cfg):
    long_text = " ".join(["dataveciptoken speech image"] * 20)
    full = dataclasses.replace(text_cfg, max_length=10_000).prepare(long_text)
    assert len(full) > 16
    short_cfg = dataclasses.replace(text_cfg, max_length=16)
    cut = short_cfg.prepare(long_text)
    assert len(cut) == 16 and cut[0] == 0 and cut[-1] == 2
    np.testing.assert_array_equal(cut[:-1], full[:15])
    with pytest.raises(InputTooLong, match=f"{len(full)} tokens.*at most 16"):
        short_cfg.prepare(long_text, truncate=False)
    # exactly max_length tokens pass untouched, with or without truncation
    text = next(t for t in corpus(200, seed=2) if len(text_cfg.prepare(t)) == 16)
    np.testing.assert_array_equal(short_cfg.prepare(text, truncate=False), text_cfg.prepare(text))


def test_text_errors(text_cfg):
    with pytest.raises(PreprocessError, match="empty"):
        text_cfg.prepare("")
    with pytest.raises(PreprocessError, match="string"):
        text_cfg.prepare(b"bytes")  # type: ignore[arg-type]
    assert issubclass(InputTooLong, PreprocessError) and issubclass(PreprocessError, ValueError)


def test_batch_tokenization_equals_per_item_tokenization(text_cfg):
    long_text = " ".join(["dataveciptoken speech image"] * 20)
    texts = [*corpus(40, seed=3), "naïve 日本 🙂", "", long_text, "bad \ud800 text"]
    short_cfg = dataclasses.replace(text_cfg, max_length=16)
    for truncate in (True, False):
        batch = short_cfg.prepare_batch(texts, truncate=truncate)
        assert len(batch) == len(texts)
        for text, result in zip(texts, batch, strict=True):
            try:
                single = short_cfg.prepare(text, truncate=truncate)
            except PreprocessError as exc:
                assert type(result) is type(exc) and str(result) == str(exc)
                continue
            ids, truncated = result
            np.testing.assert_array_equal(ids, single)
            assert ids.dtype == np.int64 and truncated == (len(text_cfg.prepare(text)) > 16)
    assert isinstance(short_cfg.prepare_batch(texts, truncate=False)[-2], InputTooLong)
    assert "cannot tokenize" in str(short_cfg.prepare_batch(texts)[-1])  # one bad text fails only itself
    lower = text_cfg.prepare_batch(texts[:1], max_length=4)[0]  # the model's own, lower limit
    assert len(lower[0]) == 4 and lower[1] and lower[0][-1] == text_cfg.eos_id


def test_tokenizer_matches_roberta_tokenizer_fast(tmp_path, text_cfg):
    from transformers import RobertaTokenizerFast

    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    text_cfg.tokenizer.model.save(str(hf_dir))  # vocab.json + merges.txt, the RoBERTa file layout
    assert sorted(p.name for p in hf_dir.iterdir()) == ["merges.txt", "vocab.json"]
    ours = TextPreprocessing.from_tokenizer(tokenizer_from_hf_files(hf_dir), max_length=64)
    # <mask> strips the space before it, as in RoBERTa's published tokenizer.json, transformers 4 and fairseq's
    # fill_mask; transformers 5 drops that flag when it builds from vocab.json + merges.txt, so we pass it here.
    ref = RobertaTokenizerFast.from_pretrained(str(hf_dir), mask_token=AddedToken("<mask>", lstrip=True))
    ref_default = RobertaTokenizerFast.from_pretrained(str(hf_dir))
    assert (ours.bos_id, ours.pad_id, ours.eos_id, ours.mask_id) == (
        ref.bos_token_id, ref.pad_token_id, ref.eos_token_id, ref.mask_token_id,
    )
    samples = [*corpus(30, seed=1), " leading space", "trailing space ", "a  b\tc\nd", "naïve 日本 🙂",
               "speech <mask> image", "<s>literal</s>", "UPPER lower 123"]
    for text in samples:
        assert ours.prepare(text).tolist() == ref(text)["input_ids"], text
        if "<mask>" not in text:
            assert ours.prepare(text).tolist() == ref_default(text)["input_ids"], text
    # tokenizer.json written by transformers gives the same tokenizer
    json_dir = tmp_path / "json"
    ref.save_pretrained(str(json_dir))
    (json_dir / "vocab.json").unlink(missing_ok=True)
    from_json = TextPreprocessing.from_tokenizer(tokenizer_from_hf_files(json_dir), max_length=64)
    for text in samples:
        assert from_json.prepare(text).tolist() == ref(text)["input_ids"], text
    assert json.loads(from_json.tokenizer_json)["truncation"] is None


def test_tokenizer_from_hf_files_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        tokenizer_from_hf_files(tmp_path)


# ---------------------------------------------------------------- configs and collate


def test_preprocessing_dicts_round_trip(text_cfg):
    for modality, cfg in (("audio", AudioPreprocessing()), ("image", ImagePreprocessing()), ("text", text_cfg)):
        d = json.loads(json.dumps(cfg.to_dict()))
        assert preprocessing_from_dict(modality, d) == cfg
    assert AudioPreprocessing().to_dict() == {"sample_rate": 16000, "normalize": True}
    assert ImagePreprocessing().to_dict() == {
        "image_size": 224, "resize_size": 224, "crop": "center", "interpolation": "bicubic",
        "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
    }
    assert set(text_cfg.to_dict()) == {"max_length", "pad_id", "bos_id", "eos_id", "mask_id", "tokenizer"}
    with pytest.raises(ValueError, match="unknown audio preprocessing keys: rate"):
        preprocessing_from_dict("audio", {"rate": 8000})
    with pytest.raises(ValueError, match="unknown modality"):
        preprocessing_from_dict("video", {})
    with pytest.raises(ValueError, match="crop"):
        ImagePreprocessing(crop="random")


def test_collate():
    audio = collate("audio", [np.ones(3, np.float32), np.full(5, 2.0, np.float32)])
    np.testing.assert_array_equal(audio["input_values"], [[1, 1, 1, 0, 0], [2, 2, 2, 2, 2]])
    np.testing.assert_array_equal(audio["attention_mask"], [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert audio["input_values"].dtype == np.float32 and audio["attention_mask"].dtype == np.int64
    text = collate("text", [np.array([0, 5, 2]), np.array([0, 2])], pad_id=7)
    np.testing.assert_array_equal(text["input_ids"], [[0, 5, 2], [0, 2, 7]])
    np.testing.assert_array_equal(text["attention_mask"], [[1, 1, 1], [1, 1, 0]])
    assert text["input_ids"].dtype == np.int64
    image = collate("image", [np.zeros((3, 8, 8), np.float32)] * 2)
    assert image.keys() == {"pixel_values"} and image["pixel_values"].shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match="differ in shape"):
        collate("image", [np.zeros((3, 8, 8), np.float32), np.zeros((3, 4, 4), np.float32)])
    with pytest.raises(ValueError, match="at least one"):
        collate("audio", [])
    with pytest.raises(ValueError, match="unknown modality"):
        collate("video", [np.zeros(2)])


def test_preprocess_does_not_import_torch():
    code = "import sys, d2v_serve.preprocess; sys.exit(int('torch' in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0

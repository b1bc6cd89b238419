"""Hostile inputs made on the fly: decompression bombs, lying headers, truncated and corrupt files, odd image modes,
NaN PCM, NUL bytes. Used by the tests, the fuzzers' seed corpus and bench/hostile_serve.py.

Each `Hostile` says what a server must answer: "ok" (embedded) or "invalid" (INVALID_ARGUMENT) with a substring of
the reason. Nothing here needs more than a few MB to make; the bombs are built blockwise.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import soundfile as sf
from PIL import Image


@dataclass(frozen=True)
class Pcm:
    data: bytes
    encoding: str  # "float32" | "int16"
    sample_rate: int
    channels: int = 1


@dataclass(frozen=True)
class Hostile:
    name: str
    kind: str  # audio | pcm | image | text
    value: bytes | str | Pcm
    expect: str  # "ok" | "invalid"
    reason: str = ""  # a substring of the INVALID_ARGUMENT message


# ---- audio ----------------------------------------------------------------------------------------------------


def tone(seconds: float, rate: int = 16000, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    wave = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    return wave if channels == 1 else np.repeat(wave[:, None], channels, axis=1)


def encode(samples: np.ndarray, rate: int, fmt: str, subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def silence_flac(minutes: float, rate: int = 48000, channels: int = 2) -> bytes:
    """Minutes of silence as FLAC: ~190 bytes per second of stereo 48 kHz, written one second at a time."""
    buf = io.BytesIO()
    block = np.zeros((rate, channels), np.float32)
    with sf.SoundFile(buf, "w", rate, channels, format="FLAC", subtype="PCM_16") as f:
        for _ in range(int(minutes * 60)):
            f.write(block)
    return buf.getvalue()


def flac_claiming(total_samples: int, seconds: float = 1.0) -> bytes:
    """A valid short FLAC whose STREAMINFO claims `total_samples` (36 bits) instead of what it holds."""
    data = bytearray(encode(tone(seconds), 16000, "FLAC"))
    assert data[:4] == b"fLaC"
    # STREAMINFO body starts at 8; bytes 18..25 pack rate(20) channels(3) bits(5) total samples(36), big-endian
    packed = int.from_bytes(data[18:26], "big")
    packed = (packed & ~(2**36 - 1)) | (total_samples & (2**36 - 1))
    data[18:26] = packed.to_bytes(8, "big")
    return bytes(data)


def wav_claiming(data_bytes: int, seconds: float = 1.0) -> bytes:
    """A WAV whose data chunk claims `data_bytes` bytes, more or fewer than it holds."""
    data = bytearray(encode(tone(seconds), 16000, "WAV", "PCM_16"))
    pos = data.index(b"data")
    data[pos + 4:pos + 8] = struct.pack("<I", data_bytes)
    return bytes(data)


def wav_with_rate(rate: int, seconds: float = 0.5) -> bytes:
    """A WAV whose header says `rate` Hz (any value libsndfile accepts)."""
    data = bytearray(encode(tone(seconds), 16000, "WAV", "PCM_16"))
    data[24:28] = struct.pack("<I", rate)
    data[28:32] = struct.pack("<I", rate * 2)  # byte rate
    return bytes(data)


# ---- images -----------------------------------------------------------------------------------------------------


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_bomb(side: int = 13370) -> bytes:
    """A 1-bit black PNG of side x side pixels, compressed row by row (13370: 21.8 KB for 179 MP)."""
    row = b"\x00" + bytes((side + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1 bit, greyscale
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def png_claiming(width: int, height: int) -> bytes:
    """A real 8x8 PNG whose IHDR claims another size (CRC fixed, so only the size lies)."""
    data = bytearray(image_bytes(picture(8, 8), "PNG"))
    ihdr = bytearray(data[16:29])
    ihdr[0:8] = struct.pack(">II", width, height)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    return bytes(data)


def picture(width: int, height: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    return img if mode == "RGB" else img.convert(mode)


def image_bytes(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def animated_gif(frames: int, side: int = 64) -> bytes:
    imgs = [Image.new("P", (side, side), color=i % 256) for i in range(frames)]
    return image_bytes(imgs[0], "GIF", save_all=True, append_images=imgs[1:], duration=10, loop=0)


# ---- the corpus -----------------------------------------------------------------------------------------------


def corpus(full: bool = False) -> list[Hostile]:
    """Every hostile case; `full` makes the bombs at the issue's size (60 min FLAC: a few seconds to build)."""
    wav = encode(tone(1.0), 16000, "WAV", "PCM_16")
    flac = encode(tone(1.0), 16000, "FLAC")
    ogg = encode(tone(1.0), 16000, "OGG", "VORBIS")
    png = image_bytes(picture(64, 64), "PNG")
    jpeg = image_bytes(picture(64, 64), "JPEG")
    nan = np.array([0.1, np.nan, 0.2] * 4000, np.float32)
    inf = np.array([0.1, np.inf, -np.inf] * 4000, np.float32)
    return [
        # the bombs
        Hostile("flac-60min-silence" if full else "flac-10min-silence", "audio",
                silence_flac(60.0 if full else 10.0), "invalid", "--max-audio-seconds"),
        Hostile("flac-header-claims-2^36-samples", "audio", flac_claiming(2**36 - 1), "invalid", "by its header"),
        Hostile("png-1bit-13370x13370", "image", png_bomb(13370), "invalid", "--max-image-pixels"),
        Hostile("text-8MiB", "text", "a " * (4 << 20), "invalid", "--max-text-chars"),
        Hostile("pcm-120-samples-at-1Hz", "pcm", Pcm(np.zeros(120, np.float32).tobytes(), "float32", 1),
                "invalid", "sample rate 1 Hz"),
        # audio: lying headers, odd rates, corrupt files
        Hostile("flac-header-claims-10-samples", "audio", flac_claiming(10), "invalid", "needs at least"),
        Hostile("flac-header-claims-half", "audio", flac_claiming(8000), "ok"),
        Hostile("wav-data-chunk-claims-4GiB", "audio", wav_claiming(0xFFFFFFF0), "ok"),
        Hostile("wav-data-chunk-claims-100-bytes", "audio", wav_claiming(100), "invalid", "needs at least"),
        Hostile("wav-rate-1Hz", "audio", wav_with_rate(1), "invalid", "sample rate"),
        Hostile("wav-rate-2MHz", "audio", wav_with_rate(2_000_000), "invalid", "sample rate"),
        Hostile("wav-truncated-header", "audio", wav[:30], "invalid", "cannot decode audio"),
        Hostile("wav-truncated-data", "audio", wav[: len(wav) // 2], "ok"),
        Hostile("flac-truncated", "audio", flac[: len(flac) // 2], "invalid", "cannot decode audio"),
        Hostile("flac-corrupt-frames", "audio", flac[:200] + bytes(range(256)) * 8, "invalid", "audio"),
        Hostile("ogg-truncated", "audio", ogg[: len(ogg) // 2], "invalid", "cannot decode audio"),
        Hostile("ogg-header-only", "audio", ogg[:60], "invalid", "cannot decode audio"),
        Hostile("not-audio", "audio", b"RIFF" + bytes(200), "invalid", "cannot decode audio"),
        Hostile("wav-65-channels", "audio", encode(np.zeros((1600, 65), np.float32), 16000, "WAV", "PCM_16"),
                "invalid", "channels"),
        # raw PCM
        Hostile("pcm-nan", "pcm", Pcm(nan.tobytes(), "float32", 16000), "invalid", "NaN"),
        Hostile("pcm-inf", "pcm", Pcm(inf.tobytes(), "float32", 16000), "invalid", "NaN or infinite"),
        Hostile("pcm-rate-400kHz", "pcm", Pcm(tone(0.1).tobytes(), "float32", 400_000), "invalid", "sample rate"),
        Hostile("pcm-odd-length", "pcm", Pcm(b"\x00" * 7, "float32", 16000), "invalid", "multiple"),
        Hostile("pcm-200-channels", "pcm", Pcm(bytes(800), "int16", 16000, 200), "invalid", "channels"),
        Hostile("pcm-121s", "pcm", Pcm(bytes(2 * 16000 * 121), "int16", 16000), "invalid", "--max-audio-seconds"),
        # images
        Hostile("png-header-claims-100000x100000", "image", png_claiming(100_000, 100_000), "invalid",
                "decompression-bomb limit"),
        Hostile("png-header-claims-4x4", "image", png_claiming(4, 4), "invalid", "cannot decode image"),
        Hostile("png-truncated", "image", png[: len(png) // 2], "invalid", "cannot decode image"),
        Hostile("png-corrupt-idat", "image", png[:60] + bytes(len(png) - 60), "invalid", "cannot decode image"),
        Hostile("jpeg-truncated", "image", jpeg[: len(jpeg) // 2], "invalid", "cannot decode image"),
        Hostile("jpeg-header-only", "image", jpeg[:120], "invalid", "cannot decode image"),
        Hostile("image-cmyk-jpeg", "image", image_bytes(picture(64, 64, "CMYK"), "JPEG"), "ok"),
        Hostile("image-16bit-png", "image", image_bytes(picture(64, 64, "I;16"), "PNG"), "ok"),
        Hostile("image-paletted-png", "image", image_bytes(picture(64, 64, "P"), "PNG"), "ok"),
        Hostile("image-animated-gif-500-frames", "image", animated_gif(500), "ok"),
        Hostile("image-eps", "image", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n", "invalid",
                "cannot decode image"),
        Hostile("not-an-image", "image", b"\x89PNG\r\n\x1a\n" + bytes(100), "invalid", "cannot decode image"),
        # text
        Hostile("text-nul-bytes", "text", "a\x00b\x00" * 20, "ok"),
        Hostile("text-only-nul", "text", "\x00", "ok"),
        Hostile("text-unpaired-surrogate", "text", "abc\ud800def", "invalid", "cannot tokenize text"),
    ]

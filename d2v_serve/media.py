"""Media facts shared by training data, serving, the client and d2v-eval: the file suffixes of each modality, and
the `data:<type>;base64,<payload>` URI that carries an encoded file inline (HTTP inputs, image inputs). Standard
library only, so the client stays light."""

from __future__ import annotations

import base64
import binascii

MEDIA_SUFFIXES = {
    "audio": frozenset({".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif", ".au", ".caf", ".w64"}),
    "image": frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}),
    "text": frozenset({".txt"}),
}


def is_data_uri(value: str | bytes) -> bool:
    return value[:5].lower() in ("data:", b"data:")


def parse_data_uri(value: str | bytes) -> tuple[str, bytes]:
    """(media type, decoded payload) of a `data:<type>;base64,<payload>` URI; the payload must be strict base64.
    Raises ValueError (one line)."""
    raw = value.encode("ascii", "replace") if isinstance(value, str) else value
    header, sep, payload = raw.partition(b",")
    if not sep or not header.lower().endswith(b";base64"):
        raise ValueError("a data URI must be data:<type>;base64,<payload>")
    try:
        return header[5:-7].decode("ascii", "replace"), base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the data URI's payload is not valid base64") from None

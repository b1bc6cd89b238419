"""Errors raised for bad client or dataset input (never for a bad configuration: that is a plain ValueError)."""

from collections.abc import Iterable


class PreprocessError(ValueError):
    """Input that cannot be turned into model inputs: undecodable, empty or malformed. The message is one line."""


class InputTooLarge(PreprocessError):
    """Input over a configured limit (seconds, pixels, characters), found from its header or length before decoding.

    `limit` names the setting that raises it (e.g. "max_image_pixels"), so a server can name its flag.
    """

    def __init__(self, message: str, limit: str) -> None:
        super().__init__(message)
        self.limit = limit


class InputTooLong(InputTooLarge):
    """Input longer than the model or a limit accepts, when truncation was not asked for (truncation would cut it)."""

    def __init__(self, message: str, limit: str = "") -> None:
        super().__init__(message, limit)


def one_line(exc: BaseException) -> str:
    """A library exception as a short single line (libsndfile and pillow messages can span lines)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def check_config_keys(modality: str, d: object, fields: Iterable[str]) -> None:
    """Reject a preprocessing dict that is not a dict or has keys the dataclass does not know (typos, newer formats)."""
    if not isinstance(d, dict):
        raise ValueError(f"{modality} preprocessing must be a dict, got {type(d).__name__}")
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"unknown {modality} preprocessing keys: {', '.join(unknown)}")

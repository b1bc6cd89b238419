"""Where training data comes from: `--data` is a directory (searched recursively, files picked by extension) or a
manifest: plain text with one path per line, or JSONL with a "path" field (audio, image, text files) or a "text"
field (text documents inline). Relative paths in a manifest are relative to the manifest's folder."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from d2v_serve.media import MEDIA_SUFFIXES as EXTENSIONS


class DataError(ValueError):
    """The data location or a manifest is unusable (one-line message naming the file)."""


@dataclass(frozen=True)
class Sources:
    """What `--data` named: files to decode, and (text only) documents given inline in a JSONL manifest."""

    files: list[Path]
    documents: list[str]

    def __len__(self) -> int:
        return len(self.files) + len(self.documents)


def find_sources(modality: str, data: str | Path | list[str | Path]) -> Sources:
    """Resolve `data` (a directory, a manifest file, a single data file, or a list of files) into sources."""
    if modality not in EXTENSIONS:
        raise DataError(f"unknown modality {modality!r}; expected one of {', '.join(EXTENSIONS)}")
    if isinstance(data, list | tuple):
        return Sources(files=[_existing(Path(p), None) for p in data], documents=[])
    path = Path(data)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in EXTENSIONS[modality] and p.is_file())
        sources = Sources(files=files, documents=[])
    elif not path.is_file():
        raise DataError(f"{path}: no such file or directory")
    elif path.suffix.lower() in EXTENSIONS[modality] and not _looks_like_manifest(modality, path):
        sources = Sources(files=[path], documents=[])
    else:
        sources = read_manifest(modality, path)
    if not len(sources):
        raise DataError(f"{path}: no {modality} data found (extensions: {' '.join(sorted(EXTENSIONS[modality]))})")
    return sources


def read_manifest(modality: str, manifest: Path) -> Sources:
    """One path per line, or JSONL objects with "path" (or "text" for the text modality). Blank lines and lines
    starting with '#' are skipped."""
    files: list[Path] = []
    documents: list[str] = []
    for lineno, line in _lines(manifest):
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{manifest}:{lineno}: invalid JSON ({exc.msg})") from None
            if modality == "text" and isinstance(record.get("text"), str):
                documents.append(record["text"])
            elif isinstance(record.get("path"), str):
                files.append(_existing(manifest.parent / record["path"], f"{manifest}:{lineno}"))
            else:
                wanted = '"text" or "path"' if modality == "text" else '"path"'
                raise DataError(f"{manifest}:{lineno}: JSON object has no {wanted} string field")
        else:
            files.append(_existing(manifest.parent / line.split("\t")[0], f"{manifest}:{lineno}"))
    return Sources(files=files, documents=documents)


def read_documents(path: Path) -> Iterator[str]:
    """A UTF-8 text file, one document per line; blank lines are skipped, surrounding whitespace removed."""
    try:
        with path.open(encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line:
                    yield line
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _looks_like_manifest(modality: str, path: Path) -> bool:
    """A .txt given to the text modality is a corpus unless every non-blank line names an existing file."""
    if modality != "text":
        return False
    lines = [line for _, line in _lines(path, limit=20)]
    return bool(lines) and all(_is_file(path.parent / line) for line in lines)


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a corpus line too long to be a file name
        return False


def _lines(path: Path, limit: int | None = None) -> Iterator[tuple[int, str]]:
    try:
        with path.open(encoding="utf-8") as f:
            count = 0
            for lineno, raw in enumerate(f, 1):
                line = raw.strip()
                if not line or line.startswith("#"):
                    continue
                yield lineno, line
                count += 1
                if limit is not None and count >= limit:
                    return
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _existing(path: Path, where: str | None) -> Path:
    if not path.is_file():
        raise DataError(f"{where + ': ' if where else ''}{path}: no such file")
    return path

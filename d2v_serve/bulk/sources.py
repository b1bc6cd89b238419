"""What a bulk job embeds: records read lazily, in a fixed order, from a folder, a manifest, a text or a Parquet file.

A text model reads texts (ids: line or row numbers), an audio or image model reads files (ids: the paths as found or
written) or, from Parquet, encoded bytes (ids: row numbers). Reading a record that names nothing usable (a missing
file, a line that is not JSON) is that record's error, not the job's.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..core.request import Input
from ..media import MEDIA_SUFFIXES

_PARQUET_BATCH_ROWS = 1024


class SourceError(ValueError):
    """The input as a whole cannot be read (one line); the job does not start."""


@dataclass(frozen=True, slots=True)
class Record:
    id: str | int
    text: str | None = None
    path: Path | None = None
    data: bytes | None = None
    error: str | None = None  # why the entry names nothing usable


@dataclass(frozen=True, slots=True)
class Failure:
    code: str
    reason: str


def load(record: Record, modality: str) -> Input | Failure:
    """The core's input for a record, or why it has none."""
    if record.error is not None:
        return Failure("INVALID_ARGUMENT", record.error)
    if record.text is not None:
        return Input("text", record.text)
    data = record.data
    if data is None:
        try:
            data = record.path.read_bytes()  # type: ignore[union-attr] - a record has a text, bytes or a path
        except FileNotFoundError:
            return Failure("NOT_FOUND", f"no such file: {record.path}")
        except OSError as exc:
            return Failure("INVALID_ARGUMENT", f"cannot read {record.path}: {exc.strerror or exc}")
    if modality == "text":
        return Input("text", data.decode("utf-8", errors="replace"))
    return Input(modality, data)


class Source:
    """INPUT as the CLI names it, for a model of `modality`; `column` names the Parquet or CSV column."""

    def __init__(self, path: str | Path, modality: str, column: str = "") -> None:
        self.path = Path(path)
        self.modality = modality
        self.column = column or ("text" if modality == "text" else "path")
        if not self.path.exists():
            raise SourceError(f"no such file or folder: {self.path}")
        suffix = self.path.suffix.lower()
        self.kind = ("folder" if self.path.is_dir() else "parquet" if suffix == ".parquet"
                     else "jsonl" if suffix in (".jsonl", ".ndjson") else "csv" if suffix == ".csv" else "lines")
        if self.kind == "parquet":
            self._check_parquet_column()
        elif self.kind == "csv":
            with self.path.open(newline="", encoding="utf-8") as f:
                header = next(csv.reader(f), [])
            if self.column not in header:
                raise SourceError(f"{self.path}: no column {self.column!r} (columns: {', '.join(header)}); "
                                  "--column names it")

    def describe(self) -> dict[str, str]:
        """What the job manifest records of its input."""
        return {"path": str(self.path.resolve()), "kind": self.kind,
                **({"column": self.column} if self.kind in ("parquet", "csv") else {})}

    @property
    def ids_are_paths(self) -> bool:
        if self.kind == "parquet":
            return self.modality != "text" and not self._binary
        return self.kind == "folder" or self.modality != "text"

    def __iter__(self) -> Iterator[Record]:
        return getattr(self, f"_{self.kind}")()

    def count(self) -> int:
        """How many records there are (a pass over the names or lines, no media read)."""
        if self.kind == "parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(self.path).metadata.num_rows
        return sum(1 for _ in self)

    # ---- the kinds --------------------------------------------------------------------------------------------

    def _folder(self) -> Iterator[Record]:
        suffixes = MEDIA_SUFFIXES[self.modality]  # text: one document per .txt file
        files = sorted(p for p in self.path.rglob("*") if p.suffix.lower() in suffixes and p.is_file())
        for p in files:
            yield Record(p.relative_to(self.path).as_posix(), path=p)

    def _entry(self, number: int, value: str | None, what: str) -> Record:
        """A text (id: its line or row number) or a path relative to the manifest (id: the path as written)."""
        if self.modality == "text":
            return Record(number, text=value) if isinstance(value, str) else Record(number, error=what)
        if not isinstance(value, str) or not value:
            return Record(str(number), error=what)
        return Record(value, path=self.path.parent / value)

    def _lines(self) -> Iterator[Record]:
        with self.path.open(encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                value = line.rstrip("\r\n")
                if value.strip():
                    yield self._entry(number, value, "")

    def _jsonl(self) -> Iterator[Record]:
        with self.path.open(encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError as exc:
                    yield self._entry(number, None, f"line {number} is not JSON ({exc.msg})")
                    continue
                value = entry.get(self.column) if isinstance(entry, dict) else None
                yield self._entry(number, value, f"line {number} has no string {self.column!r}")

    def _csv(self) -> Iterator[Record]:
        with self.path.open(newline="", encoding="utf-8", errors="replace") as f:
            for number, row in enumerate(csv.DictReader(f), 1):
                yield self._entry(number, row.get(self.column), f"row {number} has no {self.column!r}")

    def _check_parquet_column(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pq.read_schema(self.path)
        if self.column not in schema.names:
            raise SourceError(f"{self.path}: no column {self.column!r} (columns: {', '.join(schema.names)}); "
                              "--column names it")
        kind = schema.field(self.column).type
        self._binary = pa.types.is_binary(kind) or pa.types.is_large_binary(kind)
        if not (self._binary or pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise SourceError(f"{self.path}: column {self.column!r} is {kind}, not strings or bytes")
        if self._binary and self.modality == "text":
            raise SourceError(f"{self.path}: column {self.column!r} holds bytes; a text model takes strings")

    def _parquet(self) -> Iterator[Record]:
        import pyarrow.parquet as pq

        row = 0
        for batch in pq.ParquetFile(self.path).iter_batches(_PARQUET_BATCH_ROWS, columns=[self.column]):
            yield from self._parquet_records(batch.column(0).to_pylist(), row)
            row += batch.num_rows

    def parquet_blocks(self, first: int, count: int, block_rows: int) -> Iterator[list[Record]]:
        """Rows [first, first + count) of a Parquet input in lists of `block_rows`, reading only the row groups that
        hold them, a batch at a time (what a Ray read task reads, on the node that runs it)."""
        import pyarrow.parquet as pq

        file = pq.ParquetFile(self.path)
        groups, start, row = [], 0, -1
        for i in range(file.metadata.num_row_groups):
            rows = file.metadata.row_group(i).num_rows
            if start < first + count and start + rows > first:
                groups.append(i)
                row = start if row < 0 else row
            start += rows
        pending: list[Record] = []
        for batch in file.iter_batches(block_rows, row_groups=groups, columns=[self.column]) if groups else ():
            lo, hi = max(first - row, 0), min(first + count - row, batch.num_rows)
            if hi > lo:
                pending += self._parquet_records(batch.column(0).slice(lo, hi - lo).to_pylist(), row + lo)
            row += batch.num_rows
            while len(pending) >= block_rows:
                yield pending[:block_rows]
                pending = pending[block_rows:]
            if row >= first + count:
                break
        if pending:
            yield pending

    def _parquet_records(self, values: list[str | bytes | None], first: int) -> Iterator[Record]:
        for row, value in enumerate(values, first):
            if self._binary:
                yield Record(row, data=value) if value else Record(row, error=f"row {row} is empty")  # type: ignore[arg-type]
            elif self.modality == "text":
                yield Record(row, text=value) if value is not None else Record(row, error=f"row {row} is null")  # type: ignore[arg-type]
            else:
                yield self._entry(row, value, f"row {row} has no path")  # type: ignore[arg-type]

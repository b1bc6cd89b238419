"""A bulk job's output folder: Parquet shards, the job manifest, errors.jsonl, and the loop that fills them.

Records are numbered in the source's order and shard k holds records [k * shard_size, (k + 1) * shard_size), so a
shard is the same set of ids on every run. A shard is written to `part-NNNNN.parquet.tmp` and committed in this order:
the file is synced and renamed, its errors are appended to errors.jsonl, then the manifest (rewritten through a
temporary file and a rename) lists the shard with errors.jsonl's new length. A run that starts on a folder with a
manifest first undoes whatever a killed run left past the last commit (temporary files, a renamed shard the manifest
does not list, errors past the recorded length, the Ray engine's staged files), so every id ends up in exactly one
shard or one error line.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..core.request import Input
from .sources import Failure, Record, Source, load

MANIFEST = "manifest.json"
ERRORS = "errors.jsonl"
STAGING = ".staging"  # the Ray engine's write tasks' pieces, until the driver commits them as shards
FORMAT = 1
_BATCH_BYTES = 8 * 2**20  # a batch closes at this much input (encoded media), whatever its count
_PROGRESS_EVERY_S = 5.0


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


class JobRefused(ValueError):
    """The folder holds another job, or something else (one line; exit 2)."""


class Engine(Protocol):
    modality: str
    hidden_size: int
    identity: dict[str, str]

    def embed_batches(self, batches: Any) -> Iterator[list[Any]]: ...


def output_schema(hidden_size: int, dtype: str, per_position: bool, ids_are_paths: bool) -> Any:
    import pyarrow as pa

    vector = pa.list_(pa.float16() if dtype == "float16" else pa.float32(), hidden_size)
    return pa.schema([("id", pa.string() if ids_are_paths else pa.int64()),
                      ("embedding", pa.list_(vector) if per_position else vector), ("positions", pa.int32())])


def embedding_array(vectors: list[np.ndarray], hidden_size: int, per_position: bool) -> Any:
    """[n] fixed-size lists of `hidden_size` (pooled), or [n] lists of them (one per position)."""
    import pyarrow as pa

    if not vectors:
        flat = np.zeros(0, np.float32)
    else:
        flat = np.concatenate([v.reshape(-1) for v in vectors])
    rows = pa.FixedSizeListArray.from_arrays(pa.array(flat), hidden_size)
    if not per_position:
        return rows
    offsets = np.zeros(len(vectors) + 1, np.int32)
    np.cumsum([len(v) for v in vectors], out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), rows)


class ShardWriter:
    """One shard's rows, written a row group at a time to its temporary file: 1024 pooled vectors a group, 64 inputs'
    per-position outputs (`schema` tells which)."""

    def __init__(self, path: Path, schema: Any) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path, self.schema = path, schema
        vector_type = schema.field("embedding").type
        self.per_position = pa.types.is_list(vector_type)
        self.hidden = (vector_type.value_type if self.per_position else vector_type).list_size
        self.rows_per_group = 64 if self.per_position else 1024
        # no dictionary encoding: it never pays on float vectors, and trying costs more CPU than the rest of the write
        self._writer = pq.ParquetWriter(path, schema, use_dictionary=False)
        self.rows = 0
        self._ids: list[Any] = []
        self._vectors: list[np.ndarray] = []
        self._positions: list[int] = []

    def add(self, id_: Any, vector: np.ndarray, positions: int) -> None:
        self._ids.append(id_)
        self._vectors.append(vector)
        self._positions.append(positions)
        if len(self._ids) >= self.rows_per_group:
            self.flush()

    def flush(self) -> None:
        import pyarrow as pa

        if not self._ids:
            return
        columns = [pa.array(self._ids, self.schema.field("id").type),
                   embedding_array(self._vectors, self.hidden, self.per_position),
                   pa.array(self._positions, pa.int32())]
        self._writer.write_table(pa.Table.from_arrays(columns, schema=self.schema))
        self.rows += len(self._ids)
        self._ids, self._vectors, self._positions = [], [], []

    def write(self, table: Any) -> None:
        """Rows already in the shard's schema (the Ray engine's)."""
        self.flush()
        if table.num_rows:
            self._writer.write_table(table, row_group_size=self.rows_per_group)
            self.rows += table.num_rows

    def close(self) -> int:
        self.flush()
        self._writer.close()
        _fsync(self.path)
        return self.rows


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class JobDir:
    """The output folder of one job: `spec` is what makes a job the same job (model identity, options, input,
    shard size)."""

    path: Path
    spec: dict[str, Any]
    finished: dict[str, dict[str, int]] = field(default_factory=dict)
    errors_bytes: int = 0

    @classmethod
    def open(cls, path: Path, spec: dict[str, Any], resume: bool = True) -> JobDir:
        """Resume the same job's folder (or, with resume off, start it over); refuse a folder of another job."""
        path.mkdir(parents=True, exist_ok=True)
        job = cls(path, spec)
        manifest = path / MANIFEST
        if manifest.exists():
            try:
                saved = json.loads(manifest.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise JobRefused(f"{manifest} is not a d2v-bulk manifest ({exc})") from None
            if saved.get("spec") != spec:
                raise JobRefused(f"{path} holds another job ({_difference(saved.get('spec') or {}, spec)}): use "
                                 "another --out, or remove it")
            if resume:
                job.finished = saved.get("finished", {})
                job.errors_bytes = int(saved.get("errors_bytes", 0))
        elif any(path.glob("part-*.parquet")):
            raise JobRefused(f"{path} holds Parquet shards but no {MANIFEST}: use another --out")
        job._undo_uncommitted()
        job._save()
        return job

    def _undo_uncommitted(self) -> None:
        for p in self.path.glob("part-*.parquet*"):
            if p.name not in self.finished:
                p.unlink()
        errors = self.path / ERRORS
        if errors.exists() and errors.stat().st_size != self.errors_bytes:
            with errors.open("r+b") as f:
                f.truncate(self.errors_bytes)
        for p in self.path.glob("*.tmp"):
            p.unlink()
        shutil.rmtree(self.staging, ignore_errors=True)

    def _save(self) -> None:
        tmp = self.path / (MANIFEST + ".tmp")
        doc = {"format": FORMAT, "spec": self.spec, "finished": self.finished, "errors_bytes": self.errors_bytes}
        tmp.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
        _fsync(tmp)
        os.replace(tmp, self.path / MANIFEST)

    def is_finished(self, shard: int) -> bool:
        return shard_name(shard) in self.finished

    @property
    def staging(self) -> Path:
        return self.path / STAGING

    def tmp_path(self, shard: int) -> Path:
        return self.path / (shard_name(shard) + ".tmp")

    def append_errors(self, errors: list[dict[str, Any]]) -> int:
        """Append error lines; returns the file's new length."""
        with (self.path / ERRORS).open("ab") as f:
            f.write(b"".join(json.dumps(e).encode() + b"\n" for e in errors))
            f.flush()
            os.fsync(f.fileno())
            return f.tell()

    def commit(self, shard: int, rows: int, errors: list[dict[str, Any]]) -> None:
        """The shard's temporary file becomes `part-NNNNN.parquet`, its errors join errors.jsonl, the manifest lists
        it: in this order, each step durable before the next."""
        name = shard_name(shard)
        os.replace(self.tmp_path(shard), self.path / name)
        self.errors_bytes = self.append_errors(errors) if errors else self.errors_bytes
        self.finished[name] = {"rows": rows, "errors": len(errors)}
        self._save()

    @property
    def done_items(self) -> int:
        return sum(s["rows"] + s["errors"] for s in self.finished.values())


def _difference(saved: dict[str, Any], spec: dict[str, Any]) -> str:
    keys = [k for k in sorted(set(saved) | set(spec)) if saved.get(k) != spec.get(k)]
    return "; ".join(f"{k}: {json.dumps(saved.get(k), sort_keys=True)} -> {json.dumps(spec.get(k), sort_keys=True)}"
                     for k in keys)


# ---- progress ---------------------------------------------------------------------------------------------------


class Progress:
    """A bar (items/s, ETA) on a terminal, else a JSON line on stderr every few seconds."""

    def __init__(self, total: int, done: int, enabled: bool = True) -> None:
        self.total, self.done, self.errors = total, done, 0
        self.start = time.monotonic()
        self._first = done
        self._last_line = self.start
        self._bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=done, unit="item", dynamic_ncols=True, smoothing=0.1)
        self.enabled = enabled

    def advance(self, items: int, errors: int) -> None:
        self.done += items
        self.errors += errors
        if self._bar is not None:
            self._bar.update(items)
            if errors:
                self._bar.set_postfix(errors=self.errors)
            return
        now = time.monotonic()
        if self.enabled and now - self._last_line >= _PROGRESS_EVERY_S:
            self._last_line = now
            rate = (self.done - self._first) / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else None
            print(json.dumps({"done": self.done, "total": self.total, "errors": self.errors,
                              "items_per_s": round(rate, 1), "eta_s": None if eta is None else round(eta, 1)}),
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


@dataclass
class Summary:
    items: int  # handled by this run: embedded + errors
    errors: int
    wall_s: float
    shards: int  # finished, in all
    skipped: int  # items in shards finished by earlier runs

    @property
    def items_per_s(self) -> float:
        return self.items / self.wall_s if self.wall_s > 0 else 0.0

    def line(self) -> str:
        return (f"{self.items} items, {self.errors} errors, {self.wall_s:.1f} s, {self.items_per_s:.1f} items/s"
                + (f" ({self.skipped} done before)" if self.skipped else ""))


class FailFast(RuntimeError):
    """--fail-fast: the first bad input (one line)."""


# ---- the loop ---------------------------------------------------------------------------------------------------


@dataclass
class _Batch:
    shard: int
    records: list[Record]
    loaded: list[Input | Failure]
    last: bool  # the shard's last batch


def error_line(record: Record, failure: Failure) -> dict[str, Any]:
    return {"id": record.id, "code": failure.code, "reason": failure.reason}


def shard_batches(source: Source, job: JobDir, shard_size: int, batch_size: int) -> Iterator[_Batch]:
    """The unfinished shards' records in batches (at most `batch_size` inputs and about 8 MiB of them), loaded.
    A full batch waits for the next record, which tells whether it is its shard's last."""
    filling: _Batch | None = None
    full: _Batch | None = None
    size = 0
    for ordinal, record in enumerate(source):
        shard = ordinal // shard_size
        if full is not None:
            full.last = full.shard != shard
            yield full
            full = None
        if filling is not None and filling.shard != shard:
            filling.last = True
            yield filling
            filling = None
        if job.is_finished(shard):
            continue
        if filling is None:
            filling, size = _Batch(shard, [], [], False), 0
        item = load(record, source.modality)
        filling.records.append(record)
        filling.loaded.append(item)
        size += len(item.value) if isinstance(item, Input) and isinstance(item.value, bytes | str) else 0
        if len(filling.records) >= batch_size or size >= _BATCH_BYTES:
            full, filling = filling, None
    for batch in (full, filling):
        if batch is not None:
            batch.last = True
            yield batch


def run_job(source: Source, engine: Engine, job: JobDir, *, options: dict[str, Any], shard_size: int,
            batch_size: int = 64, fail_fast: bool = False, progress: Progress | None = None) -> Summary:
    """Embed every record of the unfinished shards and commit each shard when its last batch is written."""
    start = time.monotonic()
    skipped = job.done_items
    schema = output_schema(engine.hidden_size, options["dtype"], options["pooling"] == "none", source.ids_are_paths)
    pending: collections.deque[_Batch] = collections.deque()
    writer: ShardWriter | None = None
    errors: list[dict[str, Any]] = []
    items = failed = 0

    def inputs() -> Iterator[list[Input]]:
        for batch in shard_batches(source, job, shard_size, batch_size):
            pending.append(batch)
            yield [x for x in batch.loaded if isinstance(x, Input)]

    try:
        for outcomes in engine.embed_batches(inputs()):
            batch = pending.popleft()
            if writer is None:
                writer = ShardWriter(job.tmp_path(batch.shard), schema)
            results = iter(outcomes)
            batch_errors = 0
            for record, item in zip(batch.records, batch.loaded, strict=True):
                outcome = next(results) if isinstance(item, Input) else item
                if isinstance(outcome, Failure):
                    errors.append(error_line(record, outcome))
                    batch_errors += 1
                    if fail_fast:
                        job.append_errors(errors[-1:])
                        raise FailFast(f"{record.id}: {outcome.code}: {outcome.reason}")
                else:
                    writer.add(record.id, outcome[0], outcome[1])
            items += len(batch.records)
            failed += batch_errors
            if progress is not None:
                progress.advance(len(batch.records), batch_errors)
            if batch.last:
                job.commit(batch.shard, writer.close(), errors)
                writer, errors = None, []
    finally:
        if progress is not None:
            progress.close()
    return Summary(items, failed, time.monotonic() - start, len(job.finished), skipped)

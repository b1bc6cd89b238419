"""`--engine ray`: the in-process engine (the server's core) inside Ray Data actors, one model session per actor, with
the input read and the shards written by Ray Data's tasks, on the nodes that run them.

The manifest, errors.jsonl and resuming are the local job's (`job.JobDir`). Each wave of unfinished shards is one Ray
dataset: a datasource with a read task per block of records (a Parquet input's task reads its rows from the row groups
that hold them; other inputs are listed by the driver, and the actors read the files they name), `map_batches` through
an actor pool of `replicas` embedders (typed Arrow rows out), and a datasink whose write tasks write each shard's rows
to a Parquet piece under `DIR/.staging/` (synced) and return the piece's name, row count and error lines. When the
wave's writes are done the driver commits: a shard whose rows all arrived in one piece is renamed into place (pieces
of one shard that Ray split across write tasks are joined first), its errors appended, the manifest updated, as the
local job does. A job killed mid-wave leaves only pieces, which the next run removes. Needs the `ray` extra.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.data import Datasink, Datasource, ReadTask
from ray.data.block import BlockMetadata

from ..backend.runner import cpu_cores
from ..config import ServerConfig
from ..core.request import Chunking, EmbedOptions, Input
from ..models.model_file import read_metadata
from ..models.registry import file_sha256
from .engines import JobFailed, LocalEngine
from .job import (
    FailFast,
    JobDir,
    Progress,
    ShardWriter,
    Summary,
    embedding_array,
    error_line,
    output_schema,
    shard_name,
)
from .sources import Failure, Record, Source, load

_RECORD_TYPES = {"ordinal": pa.int64(), "text": pa.string(), "path": pa.string(), "data": pa.binary(),
                 "error": pa.string()}
# blocks queued per actor: one, so that a block goes to whichever actor is free (two blocks of a slow model queued
# on one actor while another idles would halve the pool), while the actor's engine pipelines within its block
_IN_FLIGHT = 1
_SHARDS_PER_REPLICA = 2  # a wave (one Ray dataset, its actors started once) is this many shards per replica


def _options_from(d: dict[str, Any]) -> EmbedOptions:
    c = d["chunking"]
    return EmbedOptions(d["representation"], d["pooling"], d["normalize"], d["dtype"], d["truncate"],
                        Chunking(c["enabled"], c["window"], c["overlap"]))


@dataclass(frozen=True)
class Shard:
    index: int
    first: int  # the ordinal of its first record
    count: int  # its records
    records: list[Record] | None = None  # listed by the driver; None: rows of a Parquet input, read by the task


def _records_table(first: int, records: list[Record], id_type: pa.DataType) -> pa.Table:
    columns = {"ordinal": range(first, first + len(records)), "id": [r.id for r in records],
               "text": [r.text for r in records], "path": [str(r.path) if r.path else None for r in records],
               "data": [r.data for r in records], "error": [r.error for r in records]}
    return pa.table({k: pa.array(v, id_type if k == "id" else _RECORD_TYPES[k]) for k, v in columns.items()})


class ShardSource(Datasource):
    """The wave's shards as Ray read tasks of at most `block_rows` records (ordinal, id, text, path, data, error) each,
    none straddling two shards: one block per task, so that each block goes to whichever actor is free (Ray joins
    the blocks one task yields into one, which one actor would then embed alone)."""

    def __init__(self, source: Source, shards: list[Shard], id_type: pa.DataType, block_rows: int) -> None:
        super().__init__()
        self.source, self.shards, self.id_type, self.block_rows = source, shards, id_type, block_rows
        self.tasks = sum(-(-shard.count // block_rows) for shard in shards)

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        tasks = []
        for shard in self.shards:
            for first in range(shard.first, shard.first + shard.count, self.block_rows):
                count = min(self.block_rows, shard.first + shard.count - first)
                at = first - shard.first
                records = None if shard.records is None else shard.records[at: at + count]
                tasks.append(ReadTask(self._reader(first, count, records),
                                      BlockMetadata(num_rows=count, size_bytes=None, exec_stats=None)))
        return tasks

    def _reader(self, first: int, count: int, records: list[Record] | None) -> Any:
        source, id_type = self.source, self.id_type

        def read() -> Iterable[pa.Table]:
            # a Parquet input's rows are read here, on the node that runs the task, from the row groups that hold them
            rows = records if records is not None else next(source.parquet_blocks(first, count, count), [])
            yield _records_table(first, rows, id_type)

        return read


class _Embedder:
    """A Ray actor: one LocalEngine (one model session); a block of records in, a typed Arrow table out (failed rows
    carry `code` and `reason`, and an empty embedding the writer drops)."""

    def __init__(self, model_path: str, options: dict[str, Any], threads: int, batch_size: int) -> None:
        # the actor holds `threads` of Ray's CPUs: ORT and the preprocessing pool take that many threads (and the
        # tokenizer's pool, through RAYON_NUM_THREADS in the actor's environment), so replicas share no cores
        config = ServerConfig(http_port=0, metrics_port=0, intra_op_threads=threads, preprocess_workers=threads)
        self.engine = LocalEngine(model_path, _options_from(options), batch_size=batch_size, config=config)
        self.batch_size = batch_size
        self.per_position = options["pooling"] == "none"
        self.dtype = np.float16 if options["dtype"] == "float16" else np.float32

    def __call__(self, table: pa.Table) -> pa.Table:
        rows = table.to_pylist()
        records = [Record(r["id"], text=r["text"], path=Path(r["path"]) if r["path"] else None, data=r["data"],
                          error=r["error"]) for r in rows]
        loaded = [load(r, self.engine.modality) for r in records]
        inputs = [x for x in loaded if isinstance(x, Input)]
        batches = [inputs[i: i + self.batch_size] for i in range(0, len(inputs), self.batch_size)]
        results = iter([o for outcomes in self.engine.embed_batches(batches) for o in outcomes])
        hidden = self.engine.hidden_size
        empty = np.zeros((0, hidden) if self.per_position else hidden, self.dtype)
        vectors, positions, codes, reasons = [], [], [], []
        for item in loaded:
            outcome = next(results) if isinstance(item, Input) else item
            failed = isinstance(outcome, Failure)
            vectors.append(empty if failed else outcome[0])
            positions.append(0 if failed else outcome[1])
            codes.append(outcome.code if failed else None)
            reasons.append(outcome.reason if failed else None)
        return pa.table({"ordinal": table.column("ordinal"), "id": table.column("id"),
                         "embedding": embedding_array(vectors, hidden, self.per_position),
                         "positions": pa.array(positions, pa.int32()), "code": pa.array(codes, pa.string()),
                         "reason": pa.array(reasons, pa.string())})


def _by_shard(table: pa.Table, shard_size: int) -> Iterator[pa.Table]:
    """A block's rows (in order) cut where the shard changes."""
    shards = pc.divide(table.column("ordinal"), shard_size).to_numpy()
    cuts = [0, *(np.flatnonzero(np.diff(shards)) + 1).tolist(), table.num_rows]
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        if b > a:
            yield table.slice(a, b - a)


class ShardSink(Datasink):
    """Ray write tasks: a task's blocks (whole shards, in order, when Ray bundles them as asked) streamed into one
    synced Parquet piece per shard under the staging folder, named by the shard and its first ordinal (a retried task
    rewrites the same names). After the write `pieces` lists what every task wrote; the driver commits them."""

    def __init__(self, staging: Path, schema: pa.Schema, shard_size: int) -> None:
        self.staging, self.schema, self.shard_size = staging, schema, shard_size
        self.pieces: list[dict[str, Any]] = []

    @property
    def min_rows_per_write(self) -> int:
        return self.shard_size

    def write(self, blocks: Iterable[pa.Table], ctx: Any) -> list[dict[str, Any]]:
        written: list[dict[str, Any]] = []
        piece: dict[str, Any] | None = None
        writer: ShardWriter | None = None
        for block in blocks:
            for part in _by_shard(block, self.shard_size):
                first = part.column("ordinal")[0].as_py()
                if piece is None or first // self.shard_size != piece["shard"] or first != piece["next"]:
                    if writer is not None:
                        written.append(self._close(piece, writer))  # type: ignore[arg-type] - set with writer
                    piece = {"shard": first // self.shard_size, "first": first, "next": first, "errors": []}
                    path = self.staging / f"{shard_name(piece['shard'])}.{first}.tmp"
                    writer = ShardWriter(path, self.schema)
                failed = pc.is_valid(part.column("code"))
                writer.write(part.filter(pc.invert(failed)).select(self.schema.names))  # type: ignore[union-attr]
                piece["errors"] += [error_line(Record(r["id"]), Failure(r["code"], r["reason"]))
                                    for r in part.filter(failed).select(["id", "code", "reason"]).to_pylist()]
                piece["next"] = first + part.num_rows
        if writer is not None:
            written.append(self._close(piece, writer))  # type: ignore[arg-type] - set with writer
        return written

    @staticmethod
    def _close(piece: dict[str, Any], writer: ShardWriter) -> dict[str, Any]:
        rows = writer.close()
        path = writer.path.with_suffix("")  # the name without .tmp: the piece is whole
        os.replace(writer.path, path)
        return {"shard": piece["shard"], "first": piece["first"], "count": piece["next"] - piece["first"],
                "rows": rows, "errors": piece["errors"], "path": str(path)}

    def on_write_complete(self, write_result: Any) -> None:
        self.pieces = [p for returned in write_result.write_returns for p in returned]


def commit_shard(job: JobDir, shard: Shard, pieces: list[dict[str, Any]], schema: pa.Schema,
                 fail_fast: bool = False) -> tuple[int, list[dict[str, Any]]]:
    """The commit step, on the driver: the shard's pieces become its file (renamed when Ray wrote it in one piece,
    joined in order otherwise), then the job commits it; with --fail-fast, a shard with an error stops the job
    instead."""
    mine = sorted((p for p in pieces if p["shard"] == shard.index), key=lambda p: p["first"])
    if sum(p["count"] for p in mine) != shard.count:
        raise JobFailed(f"{shard_name(shard.index)}: Ray wrote {sum(p['count'] for p in mine)} of its {shard.count} "
                        "rows")
    errors = [e for p in mine for e in p["errors"]]
    if errors and fail_fast:
        job.append_errors(errors[:1])
        raise FailFast(f"{errors[0]['id']}: {errors[0]['code']}: {errors[0]['reason']}")
    if len(mine) == 1:
        os.replace(mine[0]["path"], job.tmp_path(shard.index))
    else:
        writer = ShardWriter(job.tmp_path(shard.index), schema)
        for p in mine:
            writer.write(pq.read_table(p["path"], schema=schema))
        writer.close()
    rows = sum(p["rows"] for p in mine)
    job.commit(shard.index, rows, errors)
    return rows, errors


class RayJob:
    """The job on Ray: `run` in place of `job.run_job`."""

    def __init__(self, model_path: Path, opts: EmbedOptions, *, replicas: int = 1, address: str = "",
                 threads: int = 0, batch_size: int = 64) -> None:
        self.path = Path(model_path).resolve()
        meta = read_metadata(self.path)
        self.modality, self.hidden_size = meta.modality, meta.hidden_size
        self.identity = {"name": self.path.stem, "sha256": file_sha256(self.path)}
        self.replicas, self.batch_size = replicas, batch_size
        self._started_ray = not ray.is_initialized()
        if self._started_ray:
            ray.init(address=address or None, include_dashboard=False, log_to_driver=False,
                     logging_level="ERROR")
        self.cpus = max(1, int(ray.cluster_resources().get("CPU", cpu_cores())))
        self.threads = threads or max(1, self.cpus // replicas)
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # a shard's blocks reach the write tasks in order
        context.enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # a line per dataset otherwise

    def run(self, source: Source, job: JobDir, *, options: dict[str, Any], shard_size: int, fail_fast: bool = False,
            progress: Progress | None = None) -> Summary:
        """Embed the unfinished shards a wave at a time; each wave's shards are committed when its writes are done."""
        start = time.monotonic()
        skipped = job.done_items
        schema = output_schema(self.hidden_size, options["dtype"], options["pooling"] == "none", source.ids_are_paths)
        items = failed = 0
        try:
            for wave in self._waves(source, job, shard_size):
                job.staging.mkdir(exist_ok=True)
                sink = ShardSink(job.staging, schema, shard_size)
                self._embed(source, wave, options, schema).write_datasink(sink, ray_remote_args={"num_cpus": 0},
                                                                         concurrency=min(self.replicas, len(wave)))
                for shard in wave:
                    rows, errors = commit_shard(job, shard, sink.pieces, schema, fail_fast)
                    items += rows + len(errors)
                    failed += len(errors)
                    if progress is not None:
                        progress.advance(rows + len(errors), len(errors))
        finally:
            if progress is not None:
                progress.close()
        return Summary(items, failed, time.monotonic() - start, len(job.finished), skipped)

    def _waves(self, source: Source, job: JobDir, shard_size: int) -> Iterator[list[Shard]]:
        """The unfinished shards, `_SHARDS_PER_REPLICA` per replica at a time: a Parquet input's as row ranges (its
        footer tells how many rows), any other's records listed (files named, not read)."""
        wave: list[Shard] = []
        for shard in self._unfinished(source, job, shard_size):
            wave.append(shard)
            if len(wave) == _SHARDS_PER_REPLICA * self.replicas:
                yield wave
                wave = []
        if wave:
            yield wave

    @staticmethod
    def _unfinished(source: Source, job: JobDir, shard_size: int) -> Iterator[Shard]:
        if source.kind == "parquet":
            total = source.count()
            for index in range(-(-total // shard_size)):
                if not job.is_finished(index):
                    first = index * shard_size
                    yield Shard(index, first, min(shard_size, total - first))
            return
        records: list[Record] = []
        for ordinal, record in enumerate(source):
            index = ordinal // shard_size
            if not job.is_finished(index):
                records.append(record)
            if ordinal % shard_size == shard_size - 1 and records:
                yield Shard(index, index * shard_size, len(records), records)
                records = []
        if records:
            index = ordinal // shard_size
            yield Shard(index, index * shard_size, len(records), records)

    def _embed(self, source: Source, wave: list[Shard], options: dict[str, Any], schema: pa.Schema) -> Any:
        """The wave as a Ray dataset: read tasks, then an actor pool of `replicas` embedders."""
        reader = ShardSource(source, wave, schema.field("id").type, 4 * self.batch_size)
        # reads and writes ask for no CPU (they wait on storage, and the actors hold the CPUs); `concurrency` bounds
        # how many run at once, else Ray would start a worker process for every one of them
        replicas = min(self.replicas, reader.tasks)  # no more actors (and model loads) than the wave has blocks
        records = ray.data.read_datasource(reader, override_num_blocks=reader.tasks, num_cpus=0,
                                           concurrency=replicas)
        return records.map_batches(
            _Embedder, batch_format="pyarrow", batch_size=None,
            compute=ray.data.ActorPoolStrategy(size=replicas, max_tasks_in_flight_per_actor=_IN_FLIGHT),
            num_cpus=min(self.threads, self.cpus),
            runtime_env={"env_vars": {"RAYON_NUM_THREADS": str(self.threads)}},
            fn_constructor_kwargs={"model_path": str(self.path), "options": options, "threads": self.threads,
                                   "batch_size": self.batch_size})

    def close(self) -> None:
        if self._started_ray:
            ray.shutdown()

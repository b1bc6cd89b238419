"""`--engine ray`: the in-process engine (the server's core) inside Ray Data actors, one model session per actor.

Shards, the manifest, errors.jsonl and resuming are the local job's (`job.JobDir`): each wave of unfinished shards
becomes a Ray dataset of its records, `map_batches` runs them through an actor pool of `replicas` embedders (each
actor reads its records' files itself, so on a cluster the files are read where they are embedded, and returns typed
Arrow rows), and the rows come back to the driver in order, which writes and commits each shard as the local job
does. Needs the `ray` extra.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from ..backend.runner import cpu_cores
from ..config import ServerConfig
from ..core.request import Chunking, EmbedOptions, Input
from ..models.model_file import read_metadata
from ..models.registry import file_sha256
from .engines import LocalEngine
from .job import FailFast, JobDir, Progress, ShardWriter, Summary, embedding_array, error_line, output_schema
from .sources import Failure, Record, Source, load

_RECORD_FIELDS = ("ordinal", "id", "text", "path", "data", "error")
_WAVE_SHARDS = 16  # shards per Ray dataset: the actors start once per wave; the driver holds a wave's records


def _options_from(d: dict[str, Any]) -> EmbedOptions:
    c = d["chunking"]
    return EmbedOptions(d["representation"], d["pooling"], d["normalize"], d["dtype"], d["truncate"],
                        Chunking(c["enabled"], c["window"], c["overlap"]))


class _Embedder:
    """A Ray actor: one LocalEngine (one model session); a Ray batch of records in, a typed Arrow table out (failed
    rows carry `code` and `reason`, and an empty embedding the writer drops)."""

    def __init__(self, model_path: str, options: dict[str, Any], threads: int, schema: pa.Schema,
                 batch_size: int) -> None:
        config = ServerConfig(http_port=0, metrics_port=0, intra_op_threads=threads)
        self.engine = LocalEngine(model_path, _options_from(options), batch_size=batch_size, config=config)
        self.schema, self.batch_size = schema, batch_size
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
        return pa.table({"ordinal": table.column("ordinal"), "id": pa.array([r.id for r in records],
                                                                             self.schema.field("id").type),
                         "embedding": embedding_array(vectors, hidden, self.per_position),
                         "positions": pa.array(positions, pa.int32()), "code": pa.array(codes, pa.string()),
                         "reason": pa.array(reasons, pa.string())})


def _embedded_rows(table: pa.Table) -> pa.Table:
    return table.filter(pc.is_null(table.column("code"))).drop_columns(["ordinal", "code", "reason"])


def _failed_rows(table: pa.Table) -> pa.Table:
    return table.filter(pc.is_valid(table.column("code"))).select(["id", "code", "reason"])


def _by_shard(table: pa.Table, shard_size: int) -> Iterator[pa.Table]:
    """A batch of rows (in order) cut where the shard changes."""
    shards = pc.divide(table.column("ordinal"), shard_size).to_numpy()
    cuts = [0, *(np.flatnonzero(np.diff(shards)) + 1).tolist(), table.num_rows]
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        if b > a:
            yield table.slice(a, b - a)


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
        context.execution_options.preserve_order = True  # a shard's rows in the input's order
        context.enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # a line per dataset otherwise

    def run(self, source: Source, job: JobDir, *, options: dict[str, Any], shard_size: int, fail_fast: bool = False,
            progress: Progress | None = None) -> Summary:
        """Embed the unfinished shards, a wave of them per Ray dataset (one actor pool each), streaming the rows back
        in order; each shard is written and committed by the job as soon as its last row is in."""
        start = time.monotonic()
        skipped = job.done_items
        per_position = options["pooling"] == "none"
        schema = output_schema(self.hidden_size, options["dtype"], per_position, source.ids_are_paths)
        items = failed = 0
        try:
            for wave in self._waves(source, job, shard_size):
                shard, writer, errors = -1, None, []
                for table in self._embed(wave, options, schema).iter_batches(batch_format="pyarrow",
                                                                              batch_size=None):
                    for part in _by_shard(table, shard_size):
                        first = part.column("ordinal")[0].as_py() // shard_size
                        if first != shard:
                            if writer is not None:
                                job.commit(shard, writer.close(), errors)
                            shard, errors = first, []
                            writer = ShardWriter(job.tmp_path(shard), schema, 64 if per_position else 1024)
                        bad = _failed_rows(part).to_pylist()
                        errors += [error_line(Record(r["id"]), Failure(r["code"], r["reason"])) for r in bad]
                        if bad and fail_fast:
                            first = errors[-len(bad)]
                            job.append_errors([first])
                            raise FailFast(f"{first['id']}: {first['code']}: {first['reason']}")
                        writer.write(_embedded_rows(part))
                        items += part.num_rows
                        failed += len(bad)
                        if progress is not None:
                            progress.advance(part.num_rows, len(bad))
                if writer is not None:
                    job.commit(shard, writer.close(), errors)
        finally:
            if progress is not None:
                progress.close()
        return Summary(items, failed, time.monotonic() - start, len(job.finished), skipped)

    def _waves(self, source: Source, job: JobDir, shard_size: int) -> Iterator[list[dict[str, Any]]]:
        """The unfinished shards' records as plain rows (files named, not read), `_WAVE_SHARDS` shards at a time."""
        rows: list[dict[str, Any]] = []
        shards: set[int] = set()
        for ordinal, r in enumerate(source):
            shard = ordinal // shard_size
            if job.is_finished(shard):
                continue
            if shard not in shards and len(shards) == _WAVE_SHARDS:
                yield rows
                rows, shards = [], set()
            shards.add(shard)
            rows.append(dict(zip(_RECORD_FIELDS, (ordinal, r.id, r.text, str(r.path) if r.path else None, r.data,
                                                  r.error), strict=True)))
        if rows:
            yield rows

    def _embed(self, rows: list[dict[str, Any]], options: dict[str, Any], schema: pa.Schema) -> Any:
        """The records through an actor pool of `replicas` embedders, as a Ray dataset (in the records' order)."""
        types = {"ordinal": pa.int64(), "id": schema.field("id").type, "text": pa.string(), "path": pa.string(),
                 "data": pa.binary(), "error": pa.string()}
        records = pa.table({k: pa.array([r[k] for r in rows], types[k]) for k in _RECORD_FIELDS})
        step = 4 * self.batch_size
        blocks = [records.slice(i, step) for i in range(0, len(rows), step)]
        return ray.data.from_arrow(blocks).map_batches(
            _Embedder, batch_format="pyarrow", batch_size=step,
            compute=ray.data.ActorPoolStrategy(size=self.replicas), num_cpus=min(self.threads, self.cpus),
            fn_constructor_kwargs={"model_path": str(self.path), "options": options, "threads": self.threads,
                                   "schema": schema, "batch_size": self.batch_size})

    def close(self) -> None:
        if self._started_ray:
            ray.shutdown()

"""`d2v-bulk INPUT --model MODEL --out DIR`: embed a corpus into Parquet shards (see docs/bulk.md).

Exit status: 0 done (bad inputs are in DIR/errors.jsonl and counted), 1 the job stopped (the service failed, or
--fail-fast met a bad input; run it again to resume), 2 refused before starting (usage, a missing input or model,
DIR holding another job).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ..cli import DEMO_MODELS
from ..console import add_version
from ..core.request import Chunking, EmbedOptions
from ..models.model_file import ModelFileError
from .engines import JobFailed, options_dict
from .job import FailFast, JobDir, JobRefused, Progress, run_job
from .sources import Source, SourceError

RAY_HINT = "--engine ray needs Ray Data: pip install 'd2v[ray]'"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="d2v-bulk", description="Embed a folder, a manifest, a text or a Parquet file "
                                                             "into Parquet shards, resumably.")
    p.add_argument("input", help="a folder (searched by media suffix; .txt files for a text model), a manifest "
                                 "(paths one per line, JSONL with `path` or `text`, CSV), a text file (one document "
                                 "per line) or a .parquet file")
    p.add_argument("--model", required=True, help="a model file, a bundled demo model name (demo-text, demo-audio, "
                                                  "demo-image), or with --server a model the server serves")
    p.add_argument("--out", required=True, help="the output folder: part-NNNNN.parquet, manifest.json, errors.jsonl")
    p.add_argument("--column", default="", help="Parquet / CSV / JSONL field to read (default: text for a text "
                                                "model, path for audio and image; Parquet bytes are encoded files)")
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local: the server's core in this process; ray: the same on Ray Data actors")
    p.add_argument("--server", default="", help="HOST:PORT of a running d2v server: embed there over EmbedStream")
    p.add_argument("--token", default=os.environ.get("D2V_AUTH_TOKEN", ""),
                   help="with --server: bearer token [env D2V_AUTH_TOKEN]")
    p.add_argument("--replicas", type=int, default=1, help="--engine ray: actors, one model session each")
    p.add_argument("--ray-address", default="", help="--engine ray: an existing cluster (ray://host:10001, auto); "
                                                     "default: a local Ray instance")
    p.add_argument("--threads", type=int, default=0, help="ORT intra-op threads per model session (0: the cores, "
                                                          "split among the replicas)")
    p.add_argument("--pooling", choices=("mean", "cls", "none"), default="mean",
                   help="none: one vector per position (a list column)")
    p.add_argument("--normalize", action="store_true", help="L2-normalise the vectors")
    p.add_argument("--representation", choices=("last", "target"), default="last")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    p.add_argument("--truncate", action="store_true", help="cut over-long inputs instead of failing them")
    p.add_argument("--chunk", action="store_true", help="long audio and text in overlapping windows, joined")
    p.add_argument("--window", type=float, default=0.0, help="with --chunk: audio seconds or text tokens")
    p.add_argument("--overlap", type=float, default=None, help="with --chunk: audio seconds or text tokens")
    p.add_argument("--shard-size", type=int, default=10000, help="inputs per shard (the unit of resuming)")
    p.add_argument("--batch-size", type=int, default=64, help="inputs per request to the core or the server")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="skip the shards a run of the same job finished (--no-resume starts it over)")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first bad input")
    p.add_argument("--quiet", action="store_true", help="no progress, only the summary line")
    add_version(p)
    return p


def model_file(name: str) -> Path:
    """A model file, or a bundled demo model by name."""
    path = Path(name)
    if path.is_file():
        return path
    demo = DEMO_MODELS / f"{name}.onnx"
    if demo.is_file():
        return demo
    demos = ", ".join(sorted(p.stem for p in DEMO_MODELS.glob("*.onnx")))
    raise JobRefused(f"no model file {name} and no demo model of that name (demo models: {demos})")


def embed_options(args: argparse.Namespace) -> EmbedOptions:
    return EmbedOptions(args.representation, args.pooling, args.normalize, args.dtype, args.truncate,
                        Chunking(args.chunk, args.window, args.overlap))


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if (args.window or args.overlap is not None) and not args.chunk:
        parser.error("--window and --overlap need --chunk")
    if args.server and args.engine == "ray":
        parser.error("--server and --engine ray exclude each other")
    if args.shard_size < 1 or args.batch_size < 1 or args.replicas < 1:
        parser.error("--shard-size, --batch-size and --replicas must be >= 1")
    opts = embed_options(args)
    engine = None
    try:
        if args.engine == "ray":
            try:
                from .ray_engine import RayJob
            except ImportError:
                print(f"d2v-bulk: {RAY_HINT}", file=sys.stderr)
                return 2
            engine = RayJob(model_file(args.model), opts, replicas=args.replicas, address=args.ray_address,
                            threads=args.threads, batch_size=args.batch_size)
        elif args.server:
            from ..client import Client, EmbedError
            from .engines import ServerEngine

            try:
                engine = ServerEngine(Client(args.server, token=args.token or None, timeout=600.0), args.model, opts)
            except EmbedError as exc:
                print(f"d2v-bulk: {args.server}: {exc}", file=sys.stderr)
                return 2
        else:
            from ..config import ServerConfig
            from .engines import LocalEngine

            config = ServerConfig(http_port=0, metrics_port=0, intra_op_threads=args.threads)
            engine = LocalEngine(model_file(args.model), opts, batch_size=args.batch_size, config=config)
        source = Source(args.input, engine.modality, args.column)
        spec = {"model": engine.identity, "options": options_dict(opts), "input": source.describe(),
                "shard_size": args.shard_size}
        job = JobDir.open(Path(args.out), spec, resume=args.resume)
        progress = Progress(source.count(), job.done_items, enabled=not args.quiet)
        if args.engine == "ray":
            summary = engine.run(source, job, options=spec["options"], shard_size=args.shard_size,
                                 fail_fast=args.fail_fast, progress=progress)
        else:
            summary = run_job(source, engine, job, options=spec["options"], shard_size=args.shard_size,
                              batch_size=args.batch_size, fail_fast=args.fail_fast, progress=progress)
    except (JobRefused, SourceError, ModelFileError) as exc:
        print(f"d2v-bulk: {exc}", file=sys.stderr)
        return 2
    except (JobFailed, FailFast) as exc:
        print(f"d2v-bulk: {exc} (run it again to resume)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        if engine is not None:
            engine.close()
    print(f"d2v-bulk: {summary.line()}; {summary.shards} shards in {args.out}", flush=True)
    return 0

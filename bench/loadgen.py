"""The bench's load generator: a bounded, closed-loop async client, run as its own process.

    python -m bench.loadgen --grpc 127.0.0.1:50051 --model text --model-file runs/bench-models/base/text.onnx \
        --workload text-12 --concurrency 32 --duration 10 [--metrics http://127.0.0.1:9090/metrics]
    python -m bench.loadgen --http http://127.0.0.1:7997/embeddings --model text ...   # OpenAI /embeddings

`--concurrency` workers each keep one call in flight (one input per call, every input distinct: a pool made up
front, varied on reuse) until `--duration` seconds past the `--warmup`; it stops by itself (time and call bounds),
cancelling the calls still in flight then (they are not counted: the window ends at the last call that finished).
Prints one JSON object: the rate counted between batch edges (bench/stats.py), latency percentiles of the calls
started after the warm-up, errors, and, with `--metrics`, the server's batch sizes and padding over the same span.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

from bench.stats import edge_rate, percentiles  # noqa: E402
from bench.workloads import WORKLOADS, Workload, variant  # noqa: E402

Send = Callable[[Any], Awaitable[None]]


@dataclass
class LoadResult:
    workload: str
    transport: str
    concurrency: int
    calls: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    items: int = 0  # counted between batch edges
    window_s: float = 0.0
    items_per_s: float = 0.0
    units_per_s: float = 0.0
    unit: str = ""
    mean_units: float = 0.0
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    mean_ms: float = float("nan")
    distinct_inputs: int = 0
    server: dict[str, Any] = field(default_factory=dict)


async def closed_loop(send: Send, inputs: list[Any], concurrency: int, duration: float, warmup: float,
                      min_items: int = 0, max_calls: int = 1_000_000,
                      on_window_start: Callable[[], Awaitable[None]] | None = None) -> dict[str, Any]:
    """Drive `send` with `concurrency` workers, each one call at a time; returns the raw call records."""
    starts: list[float] = []
    ends: list[float] = []
    errors: Counter[str] = Counter()
    next_index = 0
    begin = time.perf_counter()
    window_start = begin + warmup
    stop_at = window_start + duration
    hard_stop = stop_at + max(duration, 30.0)  # --min-items may extend the run, never beyond this

    def more() -> bool:
        now = time.perf_counter()
        if next_index >= max_calls or now >= hard_stop:
            return False
        if now < stop_at:
            return True
        # enough completions in the window, and enough calls started in it finished for the latency percentiles
        # (half as many: with slow inputs at high concurrency each takes a whole queue's time)
        return sum(1 for t in ends if t >= window_start) < min_items or latency_samples() < max(1, min_items // 2)

    def latency_samples() -> int:
        return sum(1 for t in starts if t >= window_start)

    async def worker() -> None:
        nonlocal next_index
        while more():
            i = next_index
            next_index += 1
            item = variant(inputs[i % len(inputs)], i // len(inputs))
            t0 = time.perf_counter()
            try:
                await send(item)
            except Exception as exc:  # noqa: BLE001 - counted and reported, the run goes on
                errors[type(exc).__name__ + ": " + " ".join(str(exc).split())[:120]] += 1
                await asyncio.sleep(0.01)
                continue
            starts.append(t0)
            ends.append(time.perf_counter())

    async def mark_window() -> None:
        await asyncio.sleep(max(0.0, window_start - time.perf_counter()))
        if on_window_start is not None:
            await on_window_start()

    async def stop_when_done(workers: list[asyncio.Task]) -> None:
        """Cancel the calls still in flight once the run is over: waiting for them (with slow inputs at high
        concurrency, a whole queue's worth) would add nothing to the window and minutes to the run."""
        while more():
            await asyncio.sleep(0.05)
        if next_index >= max_calls or latency_samples() < max(1, min_items // 2):
            return  # a bounded number of calls, or the hard stop came first: the calls in flight finish
        for task in workers:
            task.cancel()

    marker = asyncio.ensure_future(mark_window())
    workers = [asyncio.ensure_future(worker()) for _ in range(concurrency)]
    stopper = asyncio.ensure_future(stop_when_done(workers))
    await asyncio.gather(*workers, return_exceptions=True)
    stopper.cancel()
    await marker
    return {"starts": starts, "ends": ends, "errors": dict(errors), "calls": next_index,
            "window": (window_start, max([stop_at, *ends]))}


def summarize(records: dict[str, Any], workload: Workload, transport: str, concurrency: int,
              mean_units: float, distinct: int) -> LoadResult:
    start, stop = records["window"]
    rate, count, seconds = edge_rate(records["ends"], start, stop)
    latencies = [(e - s) * 1000 for s, e in zip(records["starts"], records["ends"], strict=True) if s >= start]
    pct = percentiles(latencies)
    return LoadResult(workload=workload.name, transport=transport, concurrency=concurrency, calls=records["calls"],
                      errors=records["errors"], items=count, window_s=round(seconds, 3),
                      items_per_s=round(rate, 3), units_per_s=round(rate * mean_units, 3), unit=workload.unit,
                      mean_units=round(mean_units, 3), p50_ms=round(pct["p50"], 2), p99_ms=round(pct["p99"], 2),
                      mean_ms=round(sum(latencies) / len(latencies), 2) if latencies else float("nan"),
                      distinct_inputs=distinct)


# ---- transports ---------------------------------------------------------------------------------------------


def grpc_sender(target: str, model: str, channels: int) -> tuple[Send, Callable[[], Awaitable[None]]]:
    """Embed calls (one input, mean pooling) over `channels` grpc.aio channels, used round robin."""
    import grpc

    from d2v_serve._proto.d2v.v1 import embedder_pb2 as pb
    from d2v_serve._proto.d2v.v1 import embedder_pb2_grpc as pb_grpc
    from d2v_serve.client import options, to_input

    opts = [("grpc.max_receive_message_length", 256 * 2**20), ("grpc.max_send_message_length", 256 * 2**20)]
    pool = [grpc.aio.insecure_channel(target, options=opts) for _ in range(max(1, channels))]
    stubs = [pb_grpc.EmbedderStub(c) for c in pool]
    embed_options = options()
    turn = 0

    async def send(item: Any) -> None:
        nonlocal turn
        stub = stubs[turn % len(stubs)]
        turn += 1
        response = await stub.Embed(pb.EmbedRequest(model=model, inputs=[to_input(item)], options=embed_options),
                                    timeout=600)
        if len(response.embeddings) != 1:
            raise RuntimeError(f"expected 1 embedding, got {len(response.embeddings)}")

    async def close() -> None:
        for c in pool:
            await c.close()

    return send, close


def http_sender(url: str, model: str, concurrency: int) -> tuple[Send, Callable[[], Awaitable[None]]]:
    """OpenAI-style POST {model, input: [text]} -> {data: [{embedding}]} (infinity-emb, d2v's /v1/embeddings).

    aiohttp, whose C parser costs ~0.25 ms of client CPU a call here; httpx's AsyncClient cost ~5 ms, enough to
    make the client, not the server, the bottleneck on a small machine."""
    import aiohttp

    session: aiohttp.ClientSession | None = None

    async def send(item: Any) -> None:
        nonlocal session
        if not isinstance(item, str):
            raise TypeError("the HTTP transport sends text only")
        if session is None:  # made inside the running loop
            session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency),
                                            timeout=aiohttp.ClientTimeout(total=600))
        async with session.post(url, json={"model": model, "input": [item]}) as response:
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {(await response.text())[:200]}")
            data = (await response.json())["data"]
        if len(data) != 1 or not data[0]["embedding"]:
            raise RuntimeError("expected one embedding")

    async def close() -> None:
        if session is not None:
            await session.close()

    return send, close


async def fetch_text(url: str) -> str:
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session, session.get(url) as reply:
        return await reply.text()


# ---- the command --------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench.loadgen", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--grpc", help="host:port of a d2v server")
    where.add_argument("--http", help="URL of an OpenAI-style embeddings endpoint (text only)")
    p.add_argument("--model", required=True, help="model name the server knows")
    p.add_argument("--model-file", type=Path, required=True, help="the d2v model file (its tokenizer shapes texts)")
    p.add_argument("--workload", required=True, choices=sorted(WORKLOADS))
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of load before the measurement")
    p.add_argument("--min-items", type=int, default=0, help="extend the run until this many calls were measured")
    p.add_argument("--max-calls", type=int, default=1_000_000)
    p.add_argument("--pool", type=int, default=0, help="distinct inputs made up front (default: the workload's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--metrics", help="the server's /metrics URL: batch sizes and padding over the measured span")
    return p


def check_args(args: argparse.Namespace) -> None:
    if args.concurrency < 1:
        raise ValueError(f"--concurrency must be >= 1, got {args.concurrency}")
    if args.duration <= 0 or args.warmup < 0:
        raise ValueError("--duration must be > 0 and --warmup >= 0")
    if not args.model_file.is_file():
        raise ValueError(f"--model-file {args.model_file} does not exist")


async def run(args: argparse.Namespace) -> LoadResult:
    from bench.server import batch_stats
    from d2v_serve.models.model_file import read_metadata

    workload = WORKLOADS[args.workload]
    meta = read_metadata(args.model_file)
    inputs = workload.inputs(meta, args.pool or workload.pool, seed=args.seed)
    mean_units = workload.mean_units(meta, inputs)
    if args.grpc:
        send, close = grpc_sender(args.grpc, args.model, args.concurrency)
        transport = "grpc"
    else:
        send, close = http_sender(args.http, args.model, args.concurrency)
        transport = "http"
    pages: list[str] = []

    async def scrape() -> None:
        if args.metrics:
            pages.append(await fetch_text(args.metrics))

    try:
        records = await closed_loop(send, inputs, args.concurrency, args.duration, args.warmup, args.min_items,
                                    args.max_calls, on_window_start=scrape)
        await scrape()
    finally:
        await close()
    if not records["ends"] and records["errors"]:
        raise ValueError(f"every call failed, e.g. {next(iter(records['errors']))}")
    result = summarize(records, workload, transport, args.concurrency, mean_units,
                       workload.distinct(records["calls"], len(inputs)))
    if len(pages) == 2:
        result.server = batch_stats(pages[0], pages[1], args.model)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        check_args(args)
        result = asyncio.run(run(args))
    except ValueError as exc:
        print(f"bench.loadgen: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(asdict(result)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

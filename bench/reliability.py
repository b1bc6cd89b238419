"""Reliability figures of the real `d2v-serve` with the demo models, attacked from outside its process (not a test).

    .venv/bin/python -m bench.reliability                  # all sections, ~5 min; JSON on stdout
    .venv/bin/python -m bench.reliability --sections bombs,soak --soak-requests 2000

Sections (docs/reliability.md holds the figures and what each limit is for):
- bombs: each hostile input of the issue (tests/hostile.py, at full size) sent --repeat times: its status, the time
  to refuse (client wall clock), the server's peak RSS growth over its RSS before the call (VmHWM, reset through
  /proc/PID/clear_refs before each call), and the latency of a small good text request sent while the bomb is in
  flight against the same request's latency on the idle server.
- overload: the server's capacity (closed loop, requests of 32 texts), then 10x that rate open loop for
  --overload-seconds: statuses, p50/p99 of the admitted calls, and the time until an idle-latency call again.
- soak: --soak-requests mixed requests (text, audio, image, bad inputs) from 8 closed-loop clients: statuses and
  the server's RSS at start, middle and end.
- sigterm: 16 closed-loop clients, SIGTERM after 2 s: calls answered OK, refused UNAVAILABLE (the drain), and lost
  (any other status: must be 0); the exit code.
Linux only (reads /proc). The server runs with MALLOC_ARENA_MAX=2, as in the Docker image.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parent.parent

from d2v_serve._proto.d2v.v1 import embedder_pb2 as pb  # noqa: E402
from d2v_serve._proto.d2v.v1 import embedder_pb2_grpc as pb_grpc  # noqa: E402
from tests import hostile  # noqa: E402

MESSAGE_MB = 16  # the bombs fit in it, and one request's answer can exceed it (the response-size refusal)
GOOD = pb.EmbedRequest(model="demo-text", inputs=[pb.Input(text="a small good request during the attack")])
PCM = {"float32": pb.Pcm.ENCODING_FLOAT32, "int16": pb.Pcm.ENCODING_INT16}


# ---- the server process -----------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self) -> None:
        self.port = _free_port()
        exe = Path(sys.executable).with_name("d2v-serve")
        env = {**os.environ, "MALLOC_ARENA_MAX": "2"}
        self.proc = subprocess.Popen(
            [str(exe), "--host", "127.0.0.1", "--port", str(self.port), "--metrics-port", "0", "--http-port", "0",
             "--max-message-mb", str(MESSAGE_MB), "--log-level", "warning"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.target = f"127.0.0.1:{self.port}"
        self.channel = grpc.insecure_channel(self.target, options=[("grpc.max_receive_message_length", -1),
                                                                   ("grpc.max_send_message_length", -1)])
        self.stub = pb_grpc.EmbedderStub(self.channel)
        deadline = time.monotonic() + 120
        while True:
            try:
                self.stub.Embed(GOOD, timeout=5)
                break
            except grpc.RpcError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"server did not start: {self.proc.stderr.read()[-2000:]}") from None
                time.sleep(0.2)

    def status(self, key: str) -> int:
        """VmRSS / VmHWM of the server in bytes."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    def reset_peak(self) -> None:
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS

    def close(self) -> None:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _code(exc: BaseException | None) -> str:
    if exc is None:
        return "OK"
    return exc.code().name if isinstance(exc, grpc.RpcError) else type(exc).__name__


def timed(fn, *args, **kwargs) -> tuple[float, str, str]:  # noqa: ANN001
    """(seconds, status name, details) of one call."""
    start = time.perf_counter()
    try:
        fn(*args, **kwargs)
        return time.perf_counter() - start, "OK", ""
    except grpc.RpcError as exc:
        return time.perf_counter() - start, exc.code().name, exc.details() or ""


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


# ---- bombs ------------------------------------------------------------------------------------------------------


def bombs(server: ServerProcess, repeat: int) -> list[dict]:
    corpus = {c.name: c for c in hostile.corpus(full=True)}
    cases: list[tuple[str, object]] = []
    for name in ("flac-60min-silence", "flac-header-claims-2^36-samples", "png-1bit-13370x13370", "text-8MiB",
                 "pcm-120-samples-at-1Hz"):
        case = corpus[name]
        if case.kind == "pcm":
            p = case.value
            inp = pb.Input(pcm=pb.Pcm(data=p.data, encoding=PCM[p.encoding], sample_rate=p.sample_rate))
        else:
            inp = pb.Input(**{case.kind: case.value})
        model = {"audio": "demo-audio", "pcm": "demo-audio", "image": "demo-image", "text": "demo-text"}[case.kind]
        cases.append((name, pb.EmbedRequest(model=model, inputs=[inp]).SerializeToString()))
    cases.append(("malformed-protobuf-frame", b"\x0a\xff\xff\xff\xff\x0f"))
    pcm = pb.Pcm(data=bytes(2 * 100 * 1000), encoding=pb.Pcm.ENCODING_INT16, sample_rate=1000)  # 100 s at 1 kHz
    over = pb.EmbedRequest(model="demo-audio", inputs=[pb.Input(pcm=pcm)] * 16,
                           options=pb.EmbedOptions(pooling=pb.POOLING_NONE))
    cases.append((f"response-over-{MESSAGE_MB}MiB (16 x 100 s PCM, pooling none)", over.SerializeToString()))
    raw_embed = server.channel.unary_unary("/d2v.v1.Embedder/Embed")  # bytes as they are
    idle = [timed(server.stub.Embed, GOOD, timeout=30)[0] for _ in range(30)]
    rows = []
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for name, payload in cases:
            refuse, growth, good, statuses = [], [], [], Counter()
            for _ in range(repeat):
                rss = server.status("VmRSS")
                server.reset_peak()
                bomb = pool.submit(timed, raw_embed, payload, timeout=60)
                time.sleep(0.001)  # the bomb is on its way first
                good.append(timed(server.stub.Embed, GOOD, timeout=30)[0])
                seconds, code, details = bomb.result()
                refuse.append(seconds)
                statuses[code] += 1
                growth.append(server.status("VmHWM") - rss)
            rows.append({"input": name, "bytes": len(payload), "status": dict(statuses), "reason": details,
                         "refuse_ms_median": 1000 * statistics.median(refuse), "refuse_ms_max": 1000 * max(refuse),
                         "peak_rss_growth_mb_max": max(growth) / 2**20,
                         "good_request_ms_median": 1000 * statistics.median(good),
                         "good_request_idle_ms_median": 1000 * statistics.median(idle)})
    return rows


# ---- overload, soak, SIGTERM ------------------------------------------------------------------------------------


def _texts(n: int, seed: int) -> list[pb.Input]:
    rng = np.random.default_rng(seed)
    words = "the of and to in is was for that with as by on from at are this an be which or had not it".split()
    return [pb.Input(text=" ".join(rng.choice(words, size=int(rng.integers(20, 60))))) for _ in range(n)]


def overload(server: ServerProcess, seconds: float) -> dict:
    request = pb.EmbedRequest(model="demo-text", inputs=_texts(32, 0))
    idle = statistics.median(timed(server.stub.Embed, request, timeout=30)[0] for _ in range(10))
    done, stop = [], time.monotonic() + 5.0

    def loop() -> None:
        while time.monotonic() < stop:
            done.append(timed(server.stub.Embed, request, timeout=30))

    threads = [threading.Thread(target=loop) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    capacity = sum(1 for d in done if d[1] == "OK") / 5.0
    rate = 10 * capacity
    finished: list[tuple[str, float]] = []  # (status, latency) as each call ends
    lock = threading.Lock()

    def record(future: grpc.Future, sent: float) -> None:
        latency = time.perf_counter() - sent
        with lock:
            finished.append((_code(future.exception()), latency))

    sent = 0
    start = time.monotonic()
    while (now := time.monotonic()) < start + seconds:
        while sent < int((now - start) * rate):
            t0 = time.perf_counter()
            future = server.stub.Embed.future(request, timeout=30)
            future.add_done_callback(lambda f, t0=t0: record(f, t0))
            sent += 1
        time.sleep(0.001)
    while len(finished) < sent:
        time.sleep(0.05)
    statuses = Counter(code for code, _ in finished)
    admitted = [latency for code, latency in finished if code == "OK"]
    recovered_at = time.monotonic()
    while timed(server.stub.Embed, request, timeout=30)[0] > 1.5 * idle + 0.05:
        time.sleep(0.05)
    return {"capacity_requests_per_s": capacity, "inputs_per_request": 32, "offered_requests_per_s": rate,
            "seconds": seconds, "sent": sent, "statuses": dict(statuses), "idle_request_ms": 1000 * idle,
            "admitted_p50_ms": 1000 * pct(admitted, 50), "admitted_p99_ms": 1000 * pct(admitted, 99),
            "recovery_s": time.monotonic() - recovered_at}


def soak(server: ServerProcess, requests: int) -> dict:
    audio = hostile.encode(hostile.tone(1.0), 16000, "WAV", "PCM_16")
    image = hostile.image_bytes(hostile.picture(96, 80), "JPEG")
    kinds = [pb.EmbedRequest(model="demo-text", inputs=_texts(4, 1)),
             pb.EmbedRequest(model="demo-audio", inputs=[pb.Input(audio=audio)]),
             pb.EmbedRequest(model="demo-image", inputs=[pb.Input(image=image)]),
             pb.EmbedRequest(model="demo-text", inputs=[pb.Input(text="")])]  # a bad input: INVALID_ARGUMENT
    statuses, rss, lock = Counter(), {"start": server.status("VmRSS")}, threading.Lock()
    counter = iter(range(requests))

    def loop() -> None:
        for i in counter:
            _, code, _ = timed(server.stub.Embed, kinds[i % len(kinds)], timeout=60)
            with lock:
                statuses[code] += 1
                if i == requests // 2:
                    rss["middle"] = server.status("VmRSS")

    start = time.monotonic()
    threads = [threading.Thread(target=loop) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    time.sleep(1.0)
    rss["end"] = server.status("VmRSS")
    return {"requests": requests, "seconds": elapsed, "statuses": dict(statuses),
            "expected_invalid": requests // len(kinds), "rss_mb": {k: v / 2**20 for k, v in rss.items()}}


def sigterm(server: ServerProcess) -> dict:
    statuses, lock, stop = Counter(), threading.Lock(), threading.Event()
    details = Counter()
    request = pb.EmbedRequest(model="demo-text", inputs=_texts(8, 2))

    def loop() -> None:
        while not stop.is_set():
            _, code, detail = timed(server.stub.Embed, request, timeout=60)
            with lock:
                statuses[code] += 1
                if code not in ("OK", "UNAVAILABLE"):
                    details[detail] += 1
            if code == "UNAVAILABLE":
                return  # a client goes to another replica

    threads = [threading.Thread(target=loop) for _ in range(16)]
    for t in threads:
        t.start()
    time.sleep(2.0)
    server.proc.send_signal(signal.SIGTERM)
    exit_code = server.proc.wait(120)
    stop.set()
    for t in threads:
        t.join()
    lost = sum(n for code, n in statuses.items() if code not in ("OK", "UNAVAILABLE"))
    return {"clients": 16, "statuses": dict(statuses), "lost": lost, "lost_details": dict(details),
            "exit_code": exit_code}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default="bombs,overload,soak,sigterm")
    parser.add_argument("--repeat", type=int, default=5, help="calls per bomb")
    parser.add_argument("--overload-seconds", type=float, default=10.0)
    parser.add_argument("--soak-requests", type=int, default=20_000)
    args = parser.parse_args(argv)
    sections = args.sections.split(",")
    results: dict[str, object] = {"machine": f"{os.cpu_count()} cores (shared)", "server": "d2v-serve, demo models, "
                                  f"--max-message-mb {MESSAGE_MB}, MALLOC_ARENA_MAX=2, loopback"}
    server = ServerProcess()
    try:
        results["idle_rss_mb"] = server.status("VmRSS") / 2**20
        if "bombs" in sections:
            results["bombs"] = bombs(server, args.repeat)
        if "overload" in sections:
            results["overload"] = overload(server, args.overload_seconds)
        if "soak" in sections:
            results["soak"] = soak(server, args.soak_requests)
        if "sigterm" in sections:
            results["sigterm"] = sigterm(server)
    finally:
        server.close()
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

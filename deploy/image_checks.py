"""The checks deploy/test-image.sh runs on a built d2v-serve image, from outside the container.

The image runs with `buildah run --isolation chroot` (no daemon; `podman run` cannot set its rlimits on some
hosts): its ENTRYPOINT and CMD from the image config, its USER and environment as built. Chroot isolation shares the
host's network, so the server's ports are on localhost; the test picks free ones through the server's D2V_* settings.
A one-line `sh` wrapper reports the entrypoint's exit status, because buildah 1.28's own status is unreliable once
the root filesystem is read-only (it fails in its cleanup).

Reference: the same demo models served by `d2v-serve` from this interpreter's install (a pip install of the same
source), started here; the container's answers must match it within 1e-5.
Prints one `PASS name: detail` or `FAIL name: detail` line per check; exit status 1 when any failed.
Usage: python deploy/image_checks.py IMAGE BASE_IMAGE [--ca-bundle PEM]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import wave
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image as PILImage

import d2v_serve
from d2v_serve.client import Client, EmbedError

DEMO_MODELS = Path(d2v_serve.__file__).parent / "demo_models"
TOLERANCE = 1e-5
OWN_LAYERS_LIMIT_MB = 250.0
GRACE_S = 10.0  # D2V_SHUTDOWN_GRACE_S for the drain check
STATUS_MARK = "image-checks: entrypoint exit status "
TEXTS = ["a sentence for the container", "the image and the pip install must agree", "short"]

failures: list[str] = []
passes: list[str] = []


def report(name: str, ok: bool, detail: str) -> bool:
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
    (passes if ok else failures).append(name)
    return ok


def check(name: str, fn: Callable[[], str]) -> None:
    """Run fn; its return value is the PASS detail, an AssertionError or any exception a FAIL."""
    try:
        report(name, True, fn())
    except Exception as exc:  # noqa: BLE001 - every failure becomes one FAIL line
        report(name, False, f"{type(exc).__name__}: {exc}".splitlines()[0][:400])


# ------------------------------------------------------------------------------------------------------ buildah


def buildah(*args: str, timeout: float = 120, check_rc: bool = True) -> subprocess.CompletedProcess[str]:
    driver = os.environ.get("STORAGE_DRIVER")
    cmd = ["buildah", *(["--storage-driver", driver] if driver else []), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check_rc and r.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:2])}: {r.stderr.strip()[-300:]}")
    return r


def inspect(image: str) -> dict:
    return json.loads(buildah("inspect", "--type", "image", image).stdout)


def layer_bytes(image: str) -> list[int]:
    return [layer["size"] for layer in json.loads(inspect(image)["Manifest"])["layers"]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> list[int]:
    """All descendants of pid, from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class Container:
    """One working container of the image; run() starts its entrypoint, exec() a second command beside it."""

    def __init__(self, image: str, *, env: dict[str, str], volumes: Sequence[str] = (), read_only: bool = False):
        self.config = inspect(image)["Docker"]["config"]
        self.env = env
        self.id = buildah("from", "--pull-never", image).stdout.strip()
        self.tmp = Path(tempfile.mkdtemp(prefix="d2v-image-tmp-"))
        self.tmp.chmod(0o1777)  # the container's /tmp, like a fresh tmpfs; everything it writes lands here
        self.volumes = [f"{self.tmp}:/tmp", *volumes]
        self.root = Path(buildah("mount", self.id).stdout.strip())
        self.read_only = read_only
        if read_only:
            # buildah bind-mounts /run/.containerenv; the mount point must exist before the root turns read-only.
            (self.root / "run/.containerenv").touch()
            subprocess.run(["mount", "--bind", str(self.root), str(self.root)], check=True)
            subprocess.run(["mount", "-o", "remount,ro,bind", str(self.root)], check=True)
        self.proc: subprocess.Popen[str] | None = None
        self.stderr_path = self.tmp.parent / f"{self.tmp.name}.stderr"

    def _run_args(self, env: dict[str, str]) -> list[str]:
        args = ["run", "--isolation", "chroot"]
        for key, value in env.items():
            args += ["-e", f"{key}={value}"]
        for volume in self.volumes:
            args += ["-v", volume]
        return [*args, self.id, "--"]

    def run(self) -> None:
        """The image's ENTRYPOINT + CMD, as its USER (buildah applies the config's user, env and workdir)."""
        argv = [*(self.config.get("Entrypoint") or []), *(self.config.get("Cmd") or [])]
        wrapper = f'"$@"; echo "{STATUS_MARK}$?" >&2'
        driver = os.environ.get("STORAGE_DRIVER")
        cmd = ["buildah", *(["--storage-driver", driver] if driver else []), *self._run_args(self.env),
               "/bin/sh", "-c", wrapper, "sh", *argv]
        self.stderr_file = open(self.stderr_path, "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.stderr_file, text=True)

    def exec(self, argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
        """argv beside the entrypoint, as the image's USER with the container's environment (like docker exec).
        The command's own time, measured inside (buildah's setup excluded), is `elapsed_s` on the result."""
        wrapper = f's=$(date +%s%N); "$@"; rc=$?; e=$(date +%s%N); echo "{STATUS_MARK}$rc $((e - s))"'
        r = buildah(*self._run_args(self.env), "/bin/sh", "-c", wrapper, "sh", *argv, timeout=timeout,
                    check_rc=False)
        found = re.findall(re.escape(STATUS_MARK) + r"(\d+) (\d+)", r.stdout)
        stdout = re.sub(re.escape(STATUS_MARK) + r"\d+ \d+\n?", "", r.stdout)
        done = subprocess.CompletedProcess(r.args, int(found[-1][0]) if found else -1, stdout, r.stderr)
        done.elapsed_s = int(found[-1][1]) / 1e9 if found else float("nan")  # type: ignore[attr-defined]
        return done

    def server_pid(self, timeout: float = 60) -> int:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [p for p in children(self.proc.pid) if "d2v-serve" in cmdline(p)]
            if found:
                return found[0]
            assert self.proc.poll() is None, f"the container exited: {self.stderr()[-300:]}"
            time.sleep(0.2)
        raise AssertionError("no d2v-serve process in the container")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def exit_status(self, timeout: float) -> int | None:
        """The entrypoint's exit status once the container has stopped; None when it is still running."""
        assert self.proc is not None
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        found = re.findall(re.escape(STATUS_MARK) + r"(\d+)", self.stderr())
        return int(found[-1]) if found else -1

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            for pid in [p for p in children(self.proc.pid) if "d2v-serve" in cmdline(p)]:
                os.kill(pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        if self.proc is not None:
            self.stderr_file.close()
        if self.read_only:
            subprocess.run(["umount", str(self.root)], check=False)
        buildah("rm", self.id, check_rc=False)
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.stderr_path.unlink(missing_ok=True)


@contextmanager
def container(image: str, **kw: object) -> Iterator[Container]:
    c = Container(image, **kw)  # type: ignore[arg-type]
    try:
        yield c
    finally:
        c.close()


def ports_env() -> dict[str, str]:
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    return {"D2V_PORT": str(grpc_port), "D2V_HTTP_PORT": str(http_port), "D2V_METRICS_PORT": str(metrics_port),
            "D2V_PROBE_TARGET": f"localhost:{grpc_port}"}


# -------------------------------------------------------------------------------------------------- server calls


def wait_serving(target: str, alive: Callable[[], bool], timeout: float = 240) -> float:
    start = time.monotonic()
    with Client(target, timeout=5) as client:
        while True:
            try:
                if client.health() == "SERVING":
                    return time.monotonic() - start
            except EmbedError:
                pass
            assert alive(), "the server exited before it was SERVING"
            assert time.monotonic() - start < timeout, f"not SERVING after {timeout:.0f} s"
            time.sleep(0.3)


def http(port: int, path: str, body: dict | None = None, timeout: float = 60) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, {}


def sample_inputs() -> dict[str, list[object]]:
    """A few inputs per demo model, made here: sentences, a tone as WAV, a drawn PNG."""
    rate = 16000
    t = np.arange(int(rate * 1.3)) / rate
    tone = (0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype("<i2")
    wav = io.BytesIO()
    with wave.open(wav, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(tone.tobytes())
    picture = np.zeros((48, 40, 3), np.uint8)
    picture[8:30, 5:35] = (200, 40, 90)
    png = io.BytesIO()
    PILImage.fromarray(picture).save(png, "PNG")
    return {"demo-text": list(TEXTS), "demo-audio": [wav.getvalue()], "demo-image": [png.getvalue()]}


def embed_all(target: str, inputs: dict[str, list[object]]) -> dict[str, np.ndarray]:
    with Client(target, timeout=60) as client:
        return {model: np.stack(client.embed(items, model)) for model, items in inputs.items()}


def openai_embeddings(http_port: int, texts: Sequence[str]) -> np.ndarray:
    status, body = http(http_port, "/v1/embeddings", {"model": "demo-text", "input": list(texts)})
    assert status == 200, f"/v1/embeddings answered {status}"
    return np.asarray([item["embedding"] for item in body["data"]], np.float32)


def max_diff(a: dict[str, np.ndarray] | np.ndarray, b: dict[str, np.ndarray] | np.ndarray) -> float:
    if isinstance(a, dict):
        assert a.keys() == b.keys()  # type: ignore[union-attr]
        return max(max_diff(a[k], b[k]) for k in a)  # type: ignore[index]
    assert a.shape == b.shape, f"shapes {a.shape} vs {b.shape}"  # type: ignore[union-attr]
    return float(np.abs(a - b).max())  # type: ignore[operator]


@contextmanager
def reference_server() -> Iterator[tuple[str, int]]:
    """d2v-serve from this interpreter's install, on the bundled demo models."""
    env = {**os.environ, **ports_env()}
    env.pop("D2V_MODELS", None)
    exe = Path(sys.executable).with_name("d2v-serve")
    proc = subprocess.Popen([str(exe), "--host", "127.0.0.1"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    target = f"127.0.0.1:{env['D2V_PORT']}"
    try:
        wait_serving(target, lambda: proc.poll() is None)
        yield target, int(env["D2V_HTTP_PORT"])
    finally:
        proc.terminate()
        proc.wait(timeout=60)


# ------------------------------------------------------------------------------------------------------- checks


def image_checks(image: str, base: str, ca_bundle: Path | None) -> None:
    own = (sum(layer_bytes(image)) - sum(layer_bytes(base))) / 1e6

    def size() -> str:
        total = sum(layer_bytes(image)) / 1e6
        detail = f"d2v's own layers {own:.1f} MB over the base (limit {OWN_LAYERS_LIMIT_MB:.0f}); image {total:.1f} MB"
        assert own <= OWN_LAYERS_LIMIT_MB, detail
        return detail

    check("size", size)

    c = Container(image, env={})
    try:
        root = c.root
        site = next(root.glob("opt/d2v/lib/python3*/site-packages"))

        def contents() -> str:
            dists = {p.name.split("-")[0].lower() for p in site.glob("*.dist-info")}
            assert "onnxruntime" in dists and "onnxruntime_gpu" not in dists, "plain onnxruntime, not the GPU build"
            assert "torch" not in dists
            assert not {"pip", "setuptools"} & dists, f"installers left: {sorted({'pip', 'setuptools'} & dists)}"
            compilers = [p for p in ("usr/bin/gcc", "usr/bin/cc", "usr/bin/c++", "usr/bin/x86_64-linux-gnu-gcc")
                         if (root / p).exists()]
            assert not compilers, f"compilers: {compilers}"
            caches = [str(p.relative_to(root)) for p in (root / "root/.cache", root / "tmp") if p.exists()
                      and any(p.iterdir())]
            assert not caches, f"caches or leftovers: {caches}"
            pyc = sum(1 for _ in (root / "opt/d2v").rglob("*.pyc"))
            assert pyc == 0, f"{pyc} .pyc files"
            return "onnxruntime (no onnxruntime-gpu, no torch), no pip/setuptools, compilers, caches or bytecode"

        check("lean contents", contents)

        def secret_absent() -> str:
            env = c.config.get("Env") or []
            assert not [e for e in env if e.startswith(("PIP_CERT=", "REQUESTS_CA_BUNDLE=", "SSL_CERT_FILE="))], env
            assert not (root / "run/secrets/ca-bundle").exists(), "/run/secrets/ca-bundle is in the image"
            if ca_bundle is None:
                return "no CA bundle given: nothing to look for"
            own_bundle = (root / "etc/ssl/certs/ca-certificates.crt").read_text(errors="replace")
            extra = [body for body in _pem_bodies(ca_bundle.read_text()) if body not in own_bundle]
            if not extra:
                return f"no certificate of {ca_bundle} is foreign to the image's own bundle: nothing to look for"
            found = subprocess.run(["grep", "-rlF", *sum((["-e", body[:76]] for body in extra), []), str(root)],
                                   capture_output=True, text=True).stdout.split()
            assert not found, f"the build secret's certificates are in {found[:3]}"
            return (f"no PIP_CERT, no /run/secrets/ca-bundle, none of the {len(extra)} certificates of {ca_bundle} "
                    "that the image's own CA bundle lacks in any file of the image")

        check("CA bundle secret not in the image", secret_absent)
    finally:
        c.close()


def _pem_bodies(text: str) -> list[str]:
    return [re.sub(r"\s+", "", m) for m in re.findall(r"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----",
                                                      text, flags=re.DOTALL)]


def run_checks(image: str) -> None:
    inputs = sample_inputs()
    with reference_server() as (ref_target, ref_http):
        expected = embed_all(ref_target, inputs)
        expected_openai = openai_embeddings(ref_http, TEXTS)

    # 1. demo models, read-only root filesystem, /tmp the only writable place
    env = {**ports_env(), "D2V_SHUTDOWN_GRACE_S": str(GRACE_S), "D2V_MAX_DELAY_MS": "400"}
    target, http_port = f"127.0.0.1:{env['D2V_PORT']}", int(env["D2V_HTTP_PORT"])
    with container(image, env=env, read_only=True) as c:
        c.run()
        pid_box: list[int] = []

        def starts() -> str:
            pid_box.append(c.server_pid())
            took = wait_serving(target, lambda: c.proc is not None and c.proc.poll() is None)
            return f"gRPC health SERVING on localhost:{env['D2V_PORT']} after {took:.1f} s (host network)"

        check("gRPC health", starts)
        if not pid_box or failures:
            report("container", False, "did not start: " + c.stderr().strip()[-400:].replace("\n", " | "))
            return
        pid = pid_box[0]

        def http_health() -> str:
            status, body = http(http_port, "/health")
            assert status == 200, f"/health answered {status}"
            return f"GET /health 200 {json.dumps(body)}"

        check("HTTP health", http_health)

        def uid() -> str:
            line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("Uid:"))
            real = int(line.split()[1])
            assert real != 0, "the server runs as root"
            return f"d2v-serve (host pid {pid}) runs as uid {real}, image USER {c.config.get('User')}"

        check("non-root", uid)

        def embed() -> str:
            got = embed_all(target, inputs)
            diff = max_diff(got, expected)
            assert diff <= TOLERANCE, f"max |container - pip install| = {diff:.2e}"
            return f"Embed on {', '.join(inputs)}: max |container - pip install| = {diff:.1e} (<= {TOLERANCE})"

        check("Embed equals the pip install", embed)

        def openai() -> str:
            diff = max_diff(openai_embeddings(http_port, TEXTS), expected_openai)
            assert diff <= TOLERANCE, f"max |container - pip install| = {diff:.2e}"
            return f"POST /v1/embeddings ({len(TEXTS)} texts): max |container - pip install| = {diff:.1e}"

        check("/v1/embeddings equals the pip install", openai)

        def healthcheck() -> str:
            hc = c.config.get("Healthcheck") or {}
            test = hc.get("Test") or []
            assert test[:1] == ["CMD"], f"HEALTHCHECK {test}"
            timeout = hc.get("Timeout", 30e9) / 1e9
            r = c.exec(test[1:], timeout=timeout + 30)
            took = r.elapsed_s  # type: ignore[attr-defined]
            assert r.returncode == 0, f"{' '.join(test[1:])} -> {r.returncode}: {r.stderr.strip()[-200:]}"
            assert took <= timeout, f"took {took:.1f} s, over the HEALTHCHECK timeout {timeout:.0f} s"
            return f"`{' '.join(test[1:])}` exit 0 in {took:.1f} s (timeout {timeout:.0f} s): {r.stdout.strip()}"

        check("HEALTHCHECK command", healthcheck)

        def read_only() -> str:
            r = c.exec(["sh", "-c", "touch /opt/d2v/probe-write 2>&1; touch /models/x 2>&1; true"], timeout=60)
            assert r.stdout.count("Read-only file system") == 2, r.stdout + r.stderr
            written = sorted({"/".join(p.relative_to(c.tmp).parts[:2]) for p in c.tmp.rglob("*")})
            return f"served with the root read-only (writes elsewhere fail); /tmp holds {written}"

        check("read-only root filesystem", read_only)

        def drain() -> str:
            def over_http(text: str) -> np.ndarray:
                return openai_embeddings(http_port, [text])[0]

            with Client(target, timeout=60) as client, concurrent.futures.ThreadPoolExecutor(18) as pool:
                calls = [pool.submit(client.embed, TEXTS[i % 3], "demo-text") for i in range(12)]
                calls += [pool.submit(over_http, TEXTS[i % 3]) for i in range(6)]
                time.sleep(0.15)  # admitted, mostly still queued (D2V_MAX_DELAY_MS=400) when the signal arrives
                in_flight = sum(not f.done() for f in calls)
                sent = time.monotonic()
                os.kill(pid, signal.SIGTERM)
                results = [f.result(timeout=60) for f in calls]
            status = c.exit_status(timeout=GRACE_S + 20)
            took = time.monotonic() - sent
            assert all(r.shape == (64,) for r in results)
            assert status == 0, f"exit status {status}"
            assert took <= GRACE_S, f"exited {took:.1f} s after SIGTERM, grace {GRACE_S:.0f} s"
            return (f"{in_flight} of {len(calls)} calls in flight at SIGTERM, all answered; exit 0 "
                    f"{took:.1f} s after the signal (grace {GRACE_S:.0f} s)")

        check("SIGTERM drains and exits 0", drain)

    # 2. a mounted model folder replaces the demo models
    with tempfile.TemporaryDirectory(prefix="d2v-models-") as models:
        shutil.copy(DEMO_MODELS / "demo-text.onnx", Path(models) / "mounted-text.onnx")
        os.chmod(models, 0o755)
        env = ports_env()
        target = f"127.0.0.1:{env['D2V_PORT']}"
        with container(image, env=env, volumes=[f"{models}:/models:ro"]) as c:
            c.run()

            def mounted() -> str:
                wait_serving(target, lambda: c.proc is not None and c.proc.poll() is None)
                with Client(target, timeout=60) as client:
                    names = sorted(m["name"] for m in client.list_models())
                    assert names == ["mounted-text"], f"serving {names}"
                    got = np.stack(client.embed(TEXTS, "mounted-text"))
                diff = max_diff(got, expected["demo-text"])
                assert diff <= TOLERANCE, f"max diff {diff:.2e}"
                return f"/models:ro with mounted-text.onnx: serves only {names}, same vectors ({diff:.1e})"

            check("mounted models replace the demo models", mounted)

    # 3. a bad model folder: one clear line, non-zero exit
    with tempfile.TemporaryDirectory(prefix="d2v-bad-models-") as bad:
        (Path(bad) / "broken.onnx").write_bytes(b"this is not an ONNX model")
        os.chmod(bad, 0o755)
        with container(image, env=ports_env(), volumes=[f"{bad}:/models:ro"]) as c:
            c.run()

            def bad_models() -> str:
                status = c.exit_status(timeout=180)
                assert status is not None, "still running after 180 s"
                lines = [x for x in c.stderr().splitlines() if not x.startswith(STATUS_MARK)]
                plain = [x for x in lines if not x.startswith("{") and not x.startswith("d2v: ")]
                assert status != 0, "exit status 0"
                assert len(plain) == 1 and "/models/broken.onnx" in plain[0], f"stderr: {plain[-5:]}"
                return f"exit {status}, one line: {plain[0]}"

            check("bad model folder", bad_models)


def proxy_check(base: str, ca_bundle: Path | None) -> None:
    """Whether pip in the base needs the CA bundle here (a TLS-intercepting proxy), and works with it."""
    if ca_bundle is None:
        return
    with container(base, env={}, volumes=[f"{ca_bundle}:/run/secrets/ca-bundle:ro"]) as c:
        def pip_through_proxy() -> str:
            script = ("python3 -m venv /tmp/v >/dev/null && /tmp/v/bin/pip download -q --no-deps --retries 0 "
                      "--timeout 20 -d /tmp/dl {cert} six >/dev/null 2>&1 && echo ok || echo failed")
            without = c.exec(["sh", "-c", script.format(cert="")], timeout=180).stdout.strip()
            with_ca = c.exec(["sh", "-c", script.format(cert="--cert /run/secrets/ca-bundle")],
                             timeout=180).stdout.strip()
            assert with_ca == "ok", "pip fails even with the CA bundle"
            if without == "ok":
                return "pip reaches the index without the bundle here (no intercepting proxy): the secret is optional"
            return "pip in the base fails without the bundle (an intercepting proxy) and works with it"

        check("CA bundle secret needed and used", pip_through_proxy)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image")
    p.add_argument("base", help="the image's Python base, for the size of d2v's own layers")
    p.add_argument("--ca-bundle", type=Path, help="the CA bundle given to the build as the ca-bundle secret")
    args = p.parse_args(argv)
    image_checks(args.image, args.base, args.ca_bundle)
    proxy_check(args.base, args.ca_bundle)
    run_checks(args.image)
    print(f"image-checks: {len(passes)} passed, {len(failures)} failed", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())

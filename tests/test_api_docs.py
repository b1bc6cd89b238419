"""/docs (Swagger UI) and /redoc render offline: their scripts and styles come from the installed package, checked in
headless Chromium with every host but the server's unresolvable."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import urllib.request
from collections.abc import Iterator

import pytest

from d2v_serve.cli import DEMO_MODELS
from tests.serve_fixtures import ServerThread, free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    with ServerThread(DEMO_MODELS, http_port=free_port()) as srv:
        yield srv


def _page(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as reply:
        return reply.read().decode()


def _rendered(url: str) -> str:
    """The DOM after the page's scripts ran, with no network beyond 127.0.0.1."""
    assert CHROMIUM is not None
    with tempfile.TemporaryDirectory() as profile:
        r = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                            "--disable-dev-shm-usage", f"--user-data-dir={profile}",
                            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                            "--virtual-time-budget=20000", "--dump-dom", url],
                           capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


@pytest.mark.parametrize("page", ["docs", "redoc"])
def test_pages_load_no_remote_assets(server: ServerThread, page: str) -> None:
    html = _page(f"{server.http_url}/{page}")
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert assets and all(a.startswith("/") for a in assets), assets
    for asset in assets:
        with urllib.request.urlopen(f"{server.http_url}{asset}", timeout=30) as reply:
            assert reply.status == 200 and len(reply.read()) > 1000, asset


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (scripts/test installs it with apt as root)")
def test_swagger_ui_renders_offline(server: ServerThread) -> None:
    dom = _rendered(f"{server.http_url}/docs")
    assert 'class="swagger-ui"' in dom and ">d2v<" in dom.replace("\n", ""), dom[:2000]
    for path in ("/v1/embeddings", "/v1/embed", "/v1/models", "/health"):
        assert f'data-path="{path}"' in dom, path


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (scripts/test installs it with apt as root)")
def test_redoc_renders_offline(server: ServerThread) -> None:
    dom = _rendered(f"{server.http_url}/redoc")
    assert "d2v" in dom and "/v1/embeddings" in dom and "Contextualized data2vec embeddings" in dom, dom[:2000]

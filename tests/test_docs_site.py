"""The manual builds as a site with no broken link or anchor, and its configuration page is ServerConfig's."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from d2v_serve.config_reference import markdown

REPO = Path(__file__).resolve().parents[1]


def test_docs_site_builds_strictly(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                       cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "site/configuration/index.html").is_file()
    api = (tmp_path / "site/api/index.html").read_text()
    assert "--8&lt;--" not in api and "speech.wav" in api  # examples/ included, not left as markers


def test_configuration_page_is_current() -> None:
    page = (REPO / "docs/configuration.md").read_text()
    assert page == markdown(), "run: python -m d2v_serve.config_reference > docs/configuration.md"


def test_pages_state_current_facts_not_a_lab_log() -> None:
    """History lives in git: no dated runs or internal issue numbers on the README or a docs page."""
    smell = re.compile(r"\b20\d\d-\d\d-\d\d\b|\bissue \d+|"
                       r"\b(?:first|second|third|fourth|fifth|sixth|seventh|eighth) round\b", re.IGNORECASE)
    found = [f"{page.relative_to(REPO)}:{n}: {line.strip()[:80]}"
             for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
             for n, line in enumerate(page.read_text().splitlines(), 1) if smell.search(line)]
    assert not found, "\n".join(found)

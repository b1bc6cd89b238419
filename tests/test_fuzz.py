"""A short coverage-guided fuzz run (~60 s: 10 s per target plus start-up) over decode_audio, decode_image, PCM,
text and request frames, seeded with the hostile corpus. It asserts findings, never speed; the long run is
`python -m tests.fuzz --seconds 600` (docs/reliability.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fuzz import TARGETS, run_target, write_seeds

pytest.importorskip("atheris", reason="atheris (libFuzzer for Python) ships wheels for Linux only")

SECONDS_PER_TARGET = 10


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_seeds(tmp_path_factory.mktemp("seeds"))


@pytest.mark.parametrize("target", TARGETS)
def test_fuzzer_finds_nothing(target: str, seeds: dict[str, Path], tmp_path: Path) -> None:
    run = run_target(target, SECONDS_PER_TARGET, tmp_path, seeds[target])
    assert run.returncode == 0 and not run.findings, f"{run.findings}\n{run.output[-4000:]}"
    assert run.executions >= len(list(seeds[target].iterdir()))  # at least every seed ran

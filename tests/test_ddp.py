"""Two-process DDP on CPU (gloo) through torchrun, the way a user launches multi-GPU runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from d2v.training.checkpoint import load_checkpoint
from tests.test_train import SETS, write_corpus

ROOT = Path(__file__).resolve().parents[1]


def test_torchrun_two_processes_end_with_identical_parameters(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "d2v.training.cli", "--modality", "text", "--data", str(corpus), "--steps", "6", "--out", str(out),
           "--batch-size", "4", "--accum", "2", "--device", "cpu", "--lr", "1e-3", "--save-every", "3",
           "--no-progress"]
    for s in SETS["text"]:
        cmd += ["--set", s]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "terminate called" not in proc.stderr

    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    end = lines[-1]
    assert end["event"] == "end" and len(end["param_digests"]) == 2
    assert end["param_digests"][0] == end["param_digests"][1] and end["ranks_in_sync"]
    steps = [r for r in lines if "event" not in r]
    assert [r["step"] for r in steps] == list(range(1, 7))  # rank 0 alone writes the log
    assert steps[-1]["samples"] <= 6 * 2 * 2 * 4 and steps[0]["samples"] > 2 * 4  # both ranks' batches count

    ckpt = load_checkpoint(out / "ckpt.pt")
    training = ckpt["training"]
    assert training["world_size"] == 2 and len(training["rng"]["torch"]) == 2
    assert not torch.equal(training["rng"]["torch"][0], training["rng"]["torch"][1])  # dropout differs per rank
    assert training["data"]["micro_step"] == 12

    resume = cmd[: cmd.index("--modality")] + ["--out", str(out), "--resume", "--steps", "8", "--no-progress"]
    proc = subprocess.run(resume, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "event" not in r] == list(range(1, 9))
    assert lines[-1]["ranks_in_sync"] and load_checkpoint(out / "ckpt.pt")["training"]["step"] == 8

"""data2vec 2.0 vs data2vec: compute to reach the same linear-probe accuracy, on docs/quality.md's data and probe.

    .venv/bin/python -m research.objective_speed train --out runs/objective --modality image --objective data2vec \\
        --steps 2500 --probe-at 250,500,1000,1500,2000,2500
    .venv/bin/python -m research.objective_speed train --out runs/objective --modality image --objective data2vec2 \\
        --steps 600 --probe-at 100,200,300,400,600 [--set masking.num_masks=8 ...] [--name image-d2v2-lr1e-3]
    .venv/bin/python -m research.objective_speed report --out runs/objective      # OUT/objective_speed.json + table
    .venv/bin/python -m research.objective_speed probe --out runs/objective --name image-data2vec2   # a stopped run

`train` builds the modality's labelled set once (bench/quality.py's builders: the train split is the unlabelled
pretraining data, the held-out split is what the probe sees), then pretrains `tiny` in a child process with
OMP_NUM_THREADS=1 in segments (`stop_at`), copying the checkpoint at each --probe-at update and recording the child's
own process CPU time (all its threads: torch and the data-decoding threads) and wall time there. The time axis is the
training loop only: imports and the trainer's setup (model, data, tokenizer) are recorded apart, as `setup_cpu_s`.
Each checkpoint is then probed exactly as `d2v-eval CKPT DATA` (mean-pooled last layer, standardised logistic
regression, stratified 5-fold CV, seed 0); the initial weights (same preset and seed) are the step-0 point.

`report` pairs each data2vec2 run with the modality's data2vec run and gives, per modality: items/s (dataset items
and items the student encodes: x num_masks) per CPU second and per wall second, the CPU and wall time each reaches
the target probe accuracy (data2vec's final accuracy unless --target-gain-fraction), the speed-up, and data2vec2's
accuracy at data2vec's final CPU time. CPU time is the main figure: on a shared machine wall time measures the load.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

TIMELINE = "timeline.jsonl"  # one line per saved checkpoint: step, samples, cpu_s, wall_s
CURVE = "curve.json"  # the run's config, timeline and probe accuracy per checkpoint
PROBES = "probes.json"  # probe accuracy per probed step, so that a second `probe` of a run skips the done ones
RUN = "run.json"  # what `train` was asked: name, modality, objective, steps, seed, sets
REPRESENTATION = "last"  # the probe every modality has (audio has no pooled target space)

Point = tuple[float, float]  # (time in seconds, probe accuracy)


# ---------------------------------------------------------------------------------------------------- curves


def time_to_accuracy(points: list[Point], target: float) -> float | None:
    """The first time a curve reaches `target`, linear between measured points; None if it never does.

    points: (time, accuracy) in time order, the first usually (0, initial accuracy)."""
    if not points:
        return None
    if points[0][1] >= target:
        return points[0][0]
    for (t0, a0), (t1, a1) in zip(points, points[1:], strict=False):
        if a1 >= target:
            return t0 + (t1 - t0) * (target - a0) / (a1 - a0)
    return None


def accuracy_at(points: list[Point], t: float) -> float | None:
    """A curve's accuracy at time t, linear between measured points; None outside the measured range."""
    if not points or t < points[0][0] or t > points[-1][0]:
        return None
    for (t0, a0), (t1, a1) in zip(points, points[1:], strict=False):
        if t0 <= t <= t1:
            return a0 if t1 == t0 else a0 + (a1 - a0) * (t - t0) / (t1 - t0)
    return points[-1][1]


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


# ---------------------------------------------------------------------------------------------------- training


def _segments(args: argparse.Namespace) -> int:
    """Child process: run d2v-train's Trainer in segments, timing each in this process's own CPU time."""
    import torch

    from d2v.training.cli import parser, resolve
    from d2v.training.trainer import CKPT_NAME, Trainer

    run = Path(args.run)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    cfg = resolve(parser().parse_args(args.train_args), None)
    cfg.plot = False  # the curves are drawn once, after the last segment, outside the timed loop
    trainer = Trainer(cfg)
    setup = {"event": "setup", "setup_cpu_s": round(time.process_time() - cpu0, 3),
             "setup_wall_s": round(time.perf_counter() - wall0, 3), "torch_threads": torch.get_num_threads(),
             "config": cfg.to_dict()}
    timeline = (run / TIMELINE).open("w", encoding="utf-8")
    timeline.write(json.dumps(setup) + "\n")
    cpu, wall = time.process_time(), time.perf_counter()
    for stop in _probe_steps(args.probe_at, cfg.steps):
        cfg.stop_at = stop
        trainer.run()
        row = {"step": trainer.step, "samples": trainer.samples, "cpu_s": round(time.process_time() - cpu, 3),
               "wall_s": round(time.perf_counter() - wall, 3)}
        timeline.write(json.dumps(row) + "\n")
        timeline.flush()
        shutil.copyfile(run / CKPT_NAME, run / f"ckpt-{trainer.step:06d}.pt")
    timeline.close()
    trainer.plot()
    return 0


def _probe_steps(spec: str, steps: int) -> list[int]:
    out = sorted({int(s) for s in spec.split(",") if s.strip()} | {steps})
    if out[0] < 1 or out[-1] > steps:
        raise SystemExit(f"objective_speed: --probe-at must lie in 1..--steps ({steps}), got {spec}")
    return out


def _dataset(out: Path, modality: str) -> tuple[Path, Path]:
    """The modality's (train, labelled) paths, built once under OUT/data (bench/quality.py's builders)."""
    from bench.quality import BUILDERS

    data_dir = out / "data" / modality
    done = data_dir / ".built"
    build, _ = BUILDERS[modality]
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    # several `train` runs started at once into one OUT (seeds in parallel): one builds, the others wait for it
    with open(data_dir.parent / f"{modality}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists():
            return tuple(Path(p) for p in json.loads(done.read_text(encoding="utf-8")))  # type: ignore[return-value]
        if data_dir.exists():
            shutil.rmtree(data_dir)
        train, labelled = build(data_dir)
        done.write_text(json.dumps([str(train), str(labelled)]), encoding="utf-8")
    return train, labelled


def _probe(ckpt: Path, labelled: Path, initial: bool = False) -> float:
    from d2v.eval.cli import evaluate

    report = evaluate(ckpt, labelled, baseline="auto" if initial else None)
    return report["models"]["initial" if initial else "pretrained"][REPRESENTATION]["accuracy"]


def train(args: argparse.Namespace) -> int:
    out = Path(args.out)
    name = args.name or f"{args.modality}-{args.objective}" + ("" if args.seed == 1 else f"-seed{args.seed}")
    run = out / "runs" / name
    if run.exists():
        shutil.rmtree(run)
    run.mkdir(parents=True)
    train_path, _ = _dataset(out, args.modality)
    train_args = ["--modality", args.modality, "--data", str(train_path), "--preset", "tiny", "--steps",
                  str(args.steps), "--out", str(run), "--seed", str(args.seed), "--log-every", "10", "--no-progress",
                  "--save-every", str(10 ** 9)]
    if args.objective != "data2vec":  # the default objective needs no flag (and works on trees without it)
        train_args += ["--objective", args.objective]
    for s in args.set:
        train_args += ["--set", s]
    print("$ d2v-train " + " ".join(train_args), flush=True)
    (run / RUN).write_text(json.dumps({"name": name, "modality": args.modality, "objective": args.objective,
                                       "steps": args.steps, "seed": args.seed, "sets": args.set}), encoding="utf-8")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "research.objective_speed", "_segments", "--run", str(run), "--probe-at",
           args.probe_at, "--", *train_args]
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    return probe_run(out, run, args.keep_checkpoints)


def probe_run(out: Path, run: Path, keep_checkpoints: bool = False) -> int:
    """Probe every checkpoint a run's timeline lists and write its curve.json (also for a run stopped early: then
    the curve holds the checkpoints it reached, marked partial)."""
    meta = json.loads((run / RUN).read_text(encoding="utf-8"))
    _, labelled = _dataset(out, meta["modality"])
    lines = [json.loads(line) for line in (run / TIMELINE).read_text(encoding="utf-8").splitlines()]
    setup = lines[0]
    timeline = [r for r in lines[1:] if (run / f"ckpt-{r['step']:06d}.pt").exists()]
    if not timeline:
        raise SystemExit(f"objective_speed: {run} has no probed-step checkpoint yet")
    cfg = setup.pop("config")
    initial_cache = out / "data" / f"{meta['modality']}-initial-seed{meta['seed']}.json"
    if initial_cache.exists():
        initial = json.loads(initial_cache.read_text(encoding="utf-8"))["accuracy"]
    else:
        initial = _probe(run / f"ckpt-{timeline[0]['step']:06d}.pt", labelled, initial=True)
        partial_cache = initial_cache.with_suffix(f".{os.getpid()}.tmp")  # runs of one seed may probe it at once
        partial_cache.write_text(json.dumps({"accuracy": initial}), encoding="utf-8")
        partial_cache.replace(initial_cache)
    partial = timeline[-1]["step"] < meta["steps"]
    cache_path = run / PROBES
    cache = json.loads(cache_path.read_text(encoding="utf-8")) if cache_path.exists() else {}
    for row in timeline:
        ckpt = run / f"ckpt-{row['step']:06d}.pt"
        if str(row["step"]) not in cache:  # a checkpoint copied at a step never changes: probe it once
            cache[str(row["step"])] = _probe(ckpt, labelled)
            cache_path.write_text(json.dumps(cache), encoding="utf-8")
        row["accuracy"] = cache[str(row["step"])]
        print(f"{meta['name']}: step {row['step']:>5}  cpu {row['cpu_s']:8.1f} s  wall {row['wall_s']:8.1f} s  "
              f"probe {row['accuracy']:.3f}", flush=True)
        if not keep_checkpoints and row is not timeline[-1] and not partial:
            ckpt.unlink()
    curve = {**meta, "num_masks": int((cfg.get("masking") or {}).get("num_masks") or 1),
             "batch_size": cfg["batch_size"], "initial_accuracy": initial,
             "partial": partial, "machine": _machine(), **setup, "timeline": timeline}
    (run / CURVE).write_text(json.dumps(curve, indent=2) + "\n", encoding="utf-8")
    return 0


def _machine() -> str:
    load = os.getloadavg()
    return f"{os.cpu_count()} cores, load {load[0]:.1f} at the end of the run, OMP_NUM_THREADS=1"


# ---------------------------------------------------------------------------------------------------- report


def curve_points(curve: dict[str, Any], clock: str) -> list[Point]:
    """(time, accuracy) from the initial weights (time 0) through every probed checkpoint; clock: cpu_s | wall_s."""
    return [(0.0, curve["initial_accuracy"])] + [(r[clock], r["accuracy"]) for r in curve["timeline"]]


def compare(base: dict[str, Any], other: dict[str, Any], gain_fraction: float | None = None,
            targets: tuple[float, ...] = ()) -> dict[str, Any]:
    """One data2vec2 run (or seeds' mean curve) against the modality's data2vec run of the same seed(s).

    targets: further fixed accuracies at which to read both CPU times off the curves (`at_targets`)."""
    initial = base["initial_accuracy"]
    final = base["timeline"][-1]["accuracy"]
    target = final if gain_fraction is None else initial + gain_fraction * (final - initial)
    row: dict[str, Any] = {"modality": base["modality"], "run": other["name"], "baseline": base["name"],
                           "seeds": seeds_of(other), "target_accuracy": round(target, 4), "initial_accuracy": initial}
    for key, curve in (("data2vec", base), ("data2vec2", other)):
        last = curve["timeline"][-1]
        row[key] = {"steps": last["step"], "run_steps": curve.get("steps", last["step"]),
                    "final_accuracy": last["accuracy"], "cpu_s": last["cpu_s"],
                    "wall_s": last["wall_s"], "num_masks": curve["num_masks"], "sets": curve["sets"],
                    "items_per_cpu_s": round(last["samples"] / last["cpu_s"], 2),
                    "items_per_wall_s": round(last["samples"] / last["wall_s"], 2),
                    "student_items_per_cpu_s": round(last["samples"] * curve["num_masks"] / last["cpu_s"], 2),
                    "student_items_per_wall_s": round(last["samples"] * curve["num_masks"] / last["wall_s"], 2),
                    "cpu_s_to_target": time_to_accuracy(curve_points(curve, "cpu_s"), target),
                    "wall_s_to_target": time_to_accuracy(curve_points(curve, "wall_s"), target)}
    row["speedup_cpu"] = ratio(row["data2vec"]["cpu_s_to_target"], row["data2vec2"]["cpu_s_to_target"])
    row["speedup_wall"] = ratio(row["data2vec"]["wall_s_to_target"], row["data2vec2"]["wall_s_to_target"])
    budget = base["timeline"][-1]["cpu_s"]
    row["data2vec2_accuracy_at_data2vec_cpu"] = accuracy_at(curve_points(other, "cpu_s"), budget)
    row["data2vec_accuracy_at_data2vec2_cpu"] = accuracy_at(curve_points(base, "cpu_s"),
                                                            other["timeline"][-1]["cpu_s"])
    row["at_targets"] = []
    for t in sorted({*targets, target}):
        cpu = [time_to_accuracy(curve_points(c, "cpu_s"), t) for c in (base, other)]
        row["at_targets"].append({"target": round(t, 4), "data2vec_cpu_s": cpu[0], "data2vec2_cpu_s": cpu[1],
                                  "speedup_cpu": ratio(cpu[0], cpu[1])})
    return row


def seeds_of(curve: dict[str, Any]) -> list[int]:
    return list(curve["seeds"]) if "seeds" in curve else [int(curve.get("seed", 1))]


SEED_SUFFIX = re.compile(r"-s(?:eed)?\d+$")


def mean_curve(curves: list[dict[str, Any]]) -> dict[str, Any]:
    """Several seeds' runs of one setting as one curve: at each probed step they all share, the mean CPU and wall
    time, samples and probe accuracy (a probe point moves by 0.01-0.03 between neighbouring checkpoints of one run;
    the mean over seeds is what a speed-up should be read from)."""
    shared = set.intersection(*({r["step"] for r in c["timeline"]} for c in curves))
    timeline = []
    for step in sorted(shared):
        at = [next(r for r in c["timeline"] if r["step"] == step) for c in curves]
        timeline.append({"step": step, **{k: sum(r[k] for r in at) / len(at)
                                          for k in ("samples", "cpu_s", "wall_s", "accuracy")}})
    seeds = sorted(s for c in curves for s in seeds_of(c))
    first = curves[0]
    return {**{k: v for k, v in first.items() if k not in ("seed", "timeline", "name")},
            "name": f"{SEED_SUFFIX.sub('', first['name'])} (mean of {len(seeds)} seeds)", "seeds": seeds,
            "initial_accuracy": sum(c["initial_accuracy"] for c in curves) / len(curves), "timeline": timeline}


def setting(curve: dict[str, Any]) -> tuple:
    """What makes two runs the same experiment on different seeds."""
    return curve["modality"], curve["objective"], tuple(curve["sets"]), curve.get("steps")


def pair_runs(curves: list[dict[str, Any]], modality: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(data2vec run, other run) for every non-data2vec run of the modality, the data2vec run of the same seed when
    there is one (plain data2vec runs first, i.e. without --set), else the modality's first; then, for each setting
    run on several seeds that all have their own data2vec run, the two seeds' mean curves."""
    bases = sorted((c for c in curves if c["modality"] == modality and c["objective"] == "data2vec"),
                   key=lambda c: (bool(c["sets"]), c["name"] != f"{modality}-data2vec", c["name"]))
    if not bases:
        return []
    by_seed: dict[int, dict[str, Any]] = {}
    for c in bases:
        by_seed.setdefault(seeds_of(c)[0], c)
    others = [c for c in curves if c["modality"] == modality and c["objective"] != "data2vec"]
    pairs = [(by_seed.get(seeds_of(c)[0], bases[0]), c) for c in others]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for c in others:
        if seeds_of(c)[0] in by_seed:
            groups.setdefault(setting(c), []).append(c)
    for group in groups.values():
        if len({seeds_of(c)[0] for c in group}) > 1:
            pairs.append((mean_curve([by_seed[seeds_of(c)[0]] for c in group]), mean_curve(group)))
    return pairs


def report(args: argparse.Namespace) -> int:
    out = Path(args.out)
    curves = [json.loads(p.read_text(encoding="utf-8")) for p in sorted((out / "runs").glob(f"*/{CURVE}"))]
    if not curves:
        raise SystemExit(f"objective_speed: no {CURVE} under {out / 'runs'}; run `train` first")
    targets = tuple(float(t) for t in args.targets.split(",") if t.strip()) if args.targets else ()
    rows, means = [], []
    for modality in sorted({c["modality"] for c in curves}):
        pairs = pair_runs(curves, modality)
        if not pairs:
            print(f"{modality}: no data2vec run to compare with", file=sys.stderr)
        for base, other in pairs:
            rows.append(compare(base, other, args.target_gain_fraction, targets))
            if "seeds" in other:
                means += [c for c in (base, other) if c["name"] not in {m["name"] for m in means}]
    (out / "objective_speed.json").write_text(
        json.dumps({"rows": rows, "curves": curves, "mean_curves": means}, indent=2) + "\n", encoding="utf-8")
    print(table(rows))
    print()
    print(target_table(rows))
    for modality in sorted({c["modality"] for c in curves}):
        print(f"plot: {plot(curves + means, modality, rows, out / f'{modality}-objective.png')}")
    return 0


def plot(curves: list[dict[str, Any]], modality: str, rows: list[dict[str, Any]], png: Path) -> Path:
    """Probe accuracy against training CPU seconds, one line per run of the modality, the target dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    mine = [c for c in curves if c["modality"] == modality]
    averaged = {setting(c) for c in mine if "seeds" in c}
    colours: dict[tuple, Any] = {}
    for c in sorted(mine, key=lambda c: "seeds" in c):  # the means drawn last, on top
        t, a = zip(*curve_points(c, "cpu_s"), strict=True)
        colour = colours.setdefault(setting(c), f"C{len(colours)}")
        if "seeds" in c:
            ax.plot(t, a, marker="o", markersize=3.5, linewidth=2.2, color=colour, label=f"{c['name']}")
        elif setting(c) in averaged:  # one seed of a mean: faded, unlabelled
            ax.plot(t, a, linewidth=0.8, alpha=0.35, color=colour)
        else:
            ax.plot(t, a, marker="o", markersize=3, linewidth=1, color=colour,
                    label=f"{c['name']} ({c['objective']})")
    mine_rows = [r for r in rows if r["modality"] == modality]
    averaged_rows = [r for r in mine_rows if len(r["seeds"]) > 1]  # with means, only their targets: one line each
    targets = {r["target_accuracy"] for r in averaged_rows or mine_rows}
    for target in targets:
        ax.axhline(target, linestyle="--", linewidth=0.8, color="grey")
    ax.set_xlabel("training CPU seconds (one thread)")
    ax.set_ylabel("probe accuracy (last layer)")
    ax.set_title(f"{modality}: d2v-eval probe vs training compute", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| modality | run | seeds | objective | updates | CPU s | wall s | items/CPU s (student) | items/wall s | "
             "probe: initial -> final | target | CPU s to target | wall s to target | speed-up CPU / wall |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for key in ("data2vec", "data2vec2"):
            s = r[key]
            speed = (f"**{_num(r['speedup_cpu'], '.2f')}x** / {_num(r['speedup_wall'], '.2f')}x"
                     if key == "data2vec2" else "")
            lines.append(
                f"| {r['modality']} | {r['run'] if key == 'data2vec2' else r['baseline']} | {_seeds(r['seeds'])} | "
                f"{key} | {_updates(s)} | "
                f"{s['cpu_s']:.0f} | {s['wall_s']:.0f} | "
                f"{s['items_per_cpu_s']:.1f} ({s['student_items_per_cpu_s']:.1f}) | {s['items_per_wall_s']:.1f} | "
                f"{r['initial_accuracy']:.3f} -> {s['final_accuracy']:.3f} | "
                f"{r['target_accuracy']:.3f} | {_num(s['cpu_s_to_target'], '.0f')} | "
                f"{_num(s['wall_s_to_target'], '.0f')} | {speed} |")
    return "\n".join(lines)


def target_table(rows: list[dict[str, Any]]) -> str:
    """CPU seconds to each target accuracy (the --targets and data2vec's final), per row, and the speed-up."""
    lines = ["| modality | run | seeds | target | data2vec CPU s | data2vec2 CPU s | speed-up |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        for t in r["at_targets"]:
            lines.append(f"| {r['modality']} | {r['run']} | {_seeds(r['seeds'])} | {t['target']:.3f} | "
                         f"{_num(t['data2vec_cpu_s'], '.0f')} | {_num(t['data2vec2_cpu_s'], '.0f')} | "
                         f"{_num(t['speedup_cpu'], '.2f')}x |")
    return "\n".join(lines)


def _num(x: float | None, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def _seeds(seeds: list[int]) -> str:
    return ",".join(str(s) for s in seeds)


def _updates(s: dict[str, Any]) -> str:
    """Updates reached; a run stopped before its schedule's end shows both, e.g. 400 of 600."""
    return str(s["steps"]) if s["steps"] >= s["run_steps"] else f"{s['steps']} of {s['run_steps']}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="pretrain one objective, probing checkpoints along the way")
    t.add_argument("--out", default="runs/objective")
    t.add_argument("--modality", required=True, choices=["audio", "image", "text"])
    t.add_argument("--objective", default="data2vec", help="d2v-train --objective (default data2vec)")
    t.add_argument("--steps", type=int, required=True, help="updates in the run (its lr and EMA schedules)")
    t.add_argument("--probe-at", required=True, help="comma-separated updates to checkpoint and probe (and --steps)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="d2v-train --set (repeatable)")
    t.add_argument("--seed", type=int, default=1)
    t.add_argument("--name", help="run name (default MODALITY-OBJECTIVE; report pairs runs by modality)")
    t.add_argument("--keep-checkpoints", action="store_true", help="keep every probed checkpoint (default: last)")
    r = sub.add_parser("report", help="compare the runs under OUT: JSON and a markdown table")
    r.add_argument("--out", default="runs/objective")
    r.add_argument("--target-gain-fraction", type=float,
                   help="target = initial + F x (data2vec final - initial) (default: data2vec's final accuracy)")
    r.add_argument("--targets", help="comma-separated further accuracies to give the CPU times and speed-up at")
    f = sub.add_parser("probe", help="probe the checkpoints a stopped `train` run reached and write its curve")
    f.add_argument("--out", default="runs/objective")
    f.add_argument("--name", required=True, help="the run's name (a folder under OUT/runs)")
    f.add_argument("--keep-checkpoints", action="store_true")
    s = sub.add_parser("_segments")  # internal: the timed child process
    s.add_argument("--run", required=True)
    s.add_argument("--probe-at", required=True)
    s.add_argument("train_args", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    if args.command == "_segments":
        if args.train_args[:1] == ["--"]:
            args.train_args = args.train_args[1:]
        return _segments(args)
    if args.command == "probe":
        return probe_run(Path(args.out), Path(args.out) / "runs" / args.name, args.keep_checkpoints)
    return train(args) if args.command == "train" else report(args)


if __name__ == "__main__":
    sys.exit(main())

"""research/objective_speed.py's logic: time to a probe accuracy, accuracy at a time, the comparison and its report
(synthetic curves; no training, no timing)."""

from __future__ import annotations

import json
import threading
import time

import pytest

from research import objective_speed as obj


def test_time_to_accuracy_interpolates_the_first_crossing():
    points = [(0.0, 0.5), (100.0, 0.6), (200.0, 0.8), (300.0, 0.7), (400.0, 0.9)]
    assert obj.time_to_accuracy(points, 0.7) == pytest.approx(150.0)
    assert obj.time_to_accuracy(points, 0.8) == pytest.approx(200.0)
    assert obj.time_to_accuracy(points, 0.85) == pytest.approx(375.0)  # the dip at 300 does not count as reached
    assert obj.time_to_accuracy(points, 0.4) == 0.0
    assert obj.time_to_accuracy(points, 0.95) is None
    assert obj.time_to_accuracy([], 0.5) is None


def test_accuracy_at_interpolates_inside_the_measured_range_only():
    points = [(0.0, 0.5), (100.0, 0.7), (100.0, 0.7), (300.0, 0.9)]
    assert obj.accuracy_at(points, 50.0) == pytest.approx(0.6)
    assert obj.accuracy_at(points, 200.0) == pytest.approx(0.8)
    assert obj.accuracy_at(points, 300.0) == pytest.approx(0.9)
    assert obj.accuracy_at(points, 301.0) is None
    assert obj.accuracy_at(points, -1.0) is None


def test_probe_steps_always_end_at_the_run_and_stay_inside_it():
    assert obj._probe_steps("500,100,100", 1000) == [100, 500, 1000]
    with pytest.raises(SystemExit, match="1..--steps"):
        obj._probe_steps("0,100", 1000)
    with pytest.raises(SystemExit, match="1..--steps"):
        obj._probe_steps("2000", 1000)


def _curve(name: str, objective: str, cpu: list[float], acc: list[float], num_masks: int = 1,
           batch: int = 10) -> dict:
    timeline = [{"step": 100 * (i + 1), "samples": batch * 100 * (i + 1), "cpu_s": c, "wall_s": 2 * c,
                 "accuracy": a} for i, (c, a) in enumerate(zip(cpu, acc, strict=True))]
    return {"name": name, "modality": "image", "objective": objective, "sets": [], "num_masks": num_masks,
            "initial_accuracy": 0.5, "timeline": timeline}


def test_compare_gives_the_speedup_to_data2vecs_final_accuracy():
    base = _curve("image-data2vec", "data2vec", [100, 200, 300, 400], [0.6, 0.7, 0.75, 0.8])
    fast = _curve("image-data2vec2", "data2vec2", [50, 100, 150], [0.7, 0.8, 0.85], num_masks=4)
    row = obj.compare(base, fast)
    assert row["target_accuracy"] == pytest.approx(0.8)
    assert row["data2vec"]["cpu_s_to_target"] == pytest.approx(400)
    assert row["data2vec2"]["cpu_s_to_target"] == pytest.approx(100)
    assert row["speedup_cpu"] == pytest.approx(4.0)
    assert row["speedup_wall"] == pytest.approx(4.0)
    assert row["data2vec2"]["items_per_cpu_s"] == pytest.approx(3000 / 150)
    assert row["data2vec2"]["student_items_per_cpu_s"] == pytest.approx(4 * 3000 / 150)
    assert row["data2vec2_accuracy_at_data2vec_cpu"] is None  # data2vec2 stopped before data2vec's budget
    assert row["data2vec_accuracy_at_data2vec2_cpu"] == pytest.approx(0.65)  # data2vec at 150 CPU s
    half = obj.compare(base, fast, gain_fraction=0.5)  # target 0.5 + 0.5 x 0.3 = 0.65
    assert half["data2vec"]["cpu_s_to_target"] == pytest.approx(150)
    assert half["data2vec2"]["cpu_s_to_target"] == pytest.approx(37.5)


def test_compare_when_data2vec2_never_reaches_the_target():
    base = _curve("text-data2vec", "data2vec", [100, 200], [0.55, 0.6])
    slow = _curve("text-data2vec2", "data2vec2", [100, 200, 300], [0.52, 0.54, 0.58])
    row = obj.compare(base, slow)
    assert row["data2vec2"]["cpu_s_to_target"] is None and row["speedup_cpu"] is None
    assert row["data2vec2_accuracy_at_data2vec_cpu"] == pytest.approx(0.54)
    assert "—" in obj.table([row])
    slow["steps"] = 500  # stopped at 300 of a 500-update schedule
    assert "| 300 of 500 |" in obj.table([obj.compare(base, slow)])


def test_report_pairs_runs_by_modality(tmp_path, capsys):
    for curve in (_curve("image-data2vec", "data2vec", [100, 200], [0.6, 0.8]),
                  _curve("image-data2vec2", "data2vec2", [50, 100], [0.8, 0.9]),
                  _curve("image-lr", "data2vec2", [50, 100], [0.7, 0.75])):
        run = tmp_path / "runs" / curve["name"]
        run.mkdir(parents=True)
        (run / obj.CURVE).write_text(json.dumps(curve))
    assert obj.main(["report", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "objective_speed.json").read_text())["rows"]
    assert [r["run"] for r in rows] == ["image-data2vec2", "image-lr"]
    assert rows[0]["speedup_cpu"] == pytest.approx(4.0)
    assert rows[1]["speedup_cpu"] is None
    assert "image-data2vec2" in capsys.readouterr().out
    assert (tmp_path / "image-objective.png").stat().st_size > 0


def _seeded(objective: str, seed: int, cpu: list[float], acc: list[float], **kw) -> dict:
    curve = _curve(f"audio-{objective}-seed{seed}", objective, cpu, acc, **kw)
    return {**curve, "modality": "audio", "seed": seed, "steps": 100 * len(cpu)}


def test_mean_curve_averages_the_steps_every_seed_probed():
    a = _seeded("data2vec2", 2, [10, 20, 30], [0.6, 0.8, 0.9])
    b = _seeded("data2vec2", 3, [12, 22], [0.7, 0.9])
    b["timeline"][1]["step"] = 300  # seed 3 probed 100 and 300: only those two are shared
    b["initial_accuracy"] = 0.52
    mean = obj.mean_curve([a, b])
    assert mean["seeds"] == [2, 3] and mean["name"] == "audio-data2vec2 (mean of 2 seeds)"
    assert [r["step"] for r in mean["timeline"]] == [100, 300]
    assert mean["timeline"][0]["cpu_s"] == pytest.approx(11) and mean["timeline"][0]["accuracy"] == pytest.approx(0.65)
    assert mean["timeline"][1]["cpu_s"] == pytest.approx(26) and mean["timeline"][1]["accuracy"] == pytest.approx(0.9)
    assert mean["initial_accuracy"] == pytest.approx(0.51)


def test_report_pairs_each_seed_with_its_own_data2vec_run_and_adds_the_mean(tmp_path):
    curves = [_seeded("data2vec", 1, [100, 200, 300], [0.6, 0.85, 0.9]),
              _seeded("data2vec", 2, [100, 200, 300], [0.7, 0.8, 0.8]),
              _seeded("data2vec2", 1, [20, 40], [0.9, 0.92]),
              _seeded("data2vec2", 2, [20, 40], [0.7, 0.78]),
              _seeded("data2vec2", 3, [20, 40], [0.9, 0.9])]  # no data2vec run of seed 3: out of the mean
    for curve in curves:
        run = tmp_path / "runs" / curve["name"]
        run.mkdir(parents=True)
        (run / obj.CURVE).write_text(json.dumps(curve))
    assert obj.main(["report", "--out", str(tmp_path), "--targets", "0.75"]) == 0
    rows = json.loads((tmp_path / "objective_speed.json").read_text())["rows"]
    by_run = {r["run"]: r for r in rows}
    assert by_run["audio-data2vec2-seed1"]["baseline"] == "audio-data2vec-seed1"
    assert by_run["audio-data2vec2-seed1"]["speedup_cpu"] == pytest.approx(300 / 20)
    assert by_run["audio-data2vec2-seed2"]["baseline"] == "audio-data2vec-seed2"
    assert by_run["audio-data2vec2-seed2"]["speedup_cpu"] is None  # 0.78 never reaches seed 2's 0.8
    assert by_run["audio-data2vec2-seed3"]["baseline"] == "audio-data2vec-seed1"  # no seed-3 run: the first
    mean = by_run["audio-data2vec2 (mean of 2 seeds)"]
    assert mean["seeds"] == [1, 2] and mean["baseline"] == "audio-data2vec (mean of 2 seeds)"
    # data2vec's mean curve: 0.65, 0.825, 0.85 at 100, 200, 300 CPU s; data2vec2's: 0.8, 0.85 at 20, 40
    assert mean["target_accuracy"] == pytest.approx(0.85)
    assert mean["speedup_cpu"] == pytest.approx(300 / 40)
    at_075 = mean["at_targets"][0]
    assert at_075["target"] == 0.75 and at_075["data2vec2_cpu_s"] == pytest.approx(0.0 + 20 * (0.75 - 0.5) / 0.3)
    assert at_075["data2vec_cpu_s"] == pytest.approx(100 + 100 * (0.75 - 0.65) / 0.175)
    assert [t["target"] for t in mean["at_targets"]] == [0.75, 0.85]  # data2vec's final joins the --targets
    assert (tmp_path / "audio-objective.png").stat().st_size > 0


def test_report_without_runs_is_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit, match="no curve.json"):
        obj.main(["report", "--out", str(tmp_path)])


def test_runs_started_at_once_build_the_dataset_once(tmp_path, monkeypatch):
    from bench import quality

    built = []

    def slow_build(data_dir):
        built.append(data_dir)
        (data_dir / "train").mkdir(parents=True)
        time.sleep(0.3)  # long enough for the other runs to arrive while this one builds
        (data_dir / "train" / "a.wav").write_bytes(b"x")
        return data_dir / "train", data_dir / "eval"

    monkeypatch.setitem(quality.BUILDERS, "audio", (slow_build, quality.BUILDERS["audio"][1]))
    results = []
    runs = [threading.Thread(target=lambda: results.append(obj._dataset(tmp_path, "audio")))
            for _ in range(3)]
    for run in runs:
        run.start()
    for run in runs:
        run.join()
    assert len(built) == 1
    assert results == [(tmp_path / "data" / "audio" / "train", tmp_path / "data" / "audio" / "eval")] * 3
    assert (tmp_path / "data" / "audio" / "train" / "a.wav").read_bytes() == b"x"

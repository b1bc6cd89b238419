"""research/text_screen.py's pieces that need no training (the man-page paragraph reader, the candidates' config keys,
the bar chart), and bench/text_bag.py's bag-of-words model on a small generated corpus."""

from __future__ import annotations

import json

import pytest

from bench.quality import build_text
from d2v.training.config import resolve_config, set_assignment
from research import text_bag, text_screen

PAGE = r""".\" Copyright line, never text
.TH read 2 2022-12-04 "Linux man-pages"
.SH NAME
read \- read from a file descriptor
.SH DESCRIPTION
.BR read ()
attempts to read up to
.I count
bytes from file descriptor \fIfd\fP.
.PP
On files that support seeking,
the read operation commences at the file offset.
.SH RETURN VALUE
On success, the number of bytes read is returned.
"""


def test_man_paragraphs_keep_the_description_as_plain_text():
    assert text_screen.man_paragraphs(PAGE) == [
        "read () attempts to read up to count bytes from file descriptor fd.",
        "On files that support seeking, the read operation commences at the file offset.",
    ]


def test_every_candidate_names_known_config_keys():
    for name, (extra, steps) in text_screen.CANDIDATES.items():
        objective = extra[extra.index("--objective") + 1] if "--objective" in extra else "data2vec"
        recipe = extra[extra.index("--recipe") + 1] if "--recipe" in extra else None
        sets = [set_assignment(v) for f, v in zip(extra, extra[1:], strict=False) if f == "--set"]
        resolve_config("text", objective, recipe, sets)  # raises ConfigError on an unknown key or a wrong type
        assert steps > 0, name


def test_lsa_reference_finds_the_topics_a_random_projection_blurs(tmp_path):
    ref = text_screen.lsa_reference(tmp_path)
    assert set(ref) == {"counts", "random-64", "lsa-64"}
    assert all(1 / 6 < v <= 1 for v in ref.values())
    assert ref["lsa-64"] > ref["random-64"] + 0.1


def test_plot_draws_one_bar_per_result(tmp_path):
    results = [{"name": "defaults", "pretrained": {"last": 0.45}, "initial": {"last": 0.47}},
               {"name": "better", "pretrained": {"last": 0.60}, "initial": {"last": 0.47}}]
    text_screen.plot(results, tmp_path / "screen.png")
    assert (tmp_path / "screen.png").stat().st_size > 1000


@pytest.mark.parametrize("objective", text_bag.OBJECTIVES)
def test_bag_model_trains_and_probes_each_objective(tmp_path, objective):
    train_path, labelled_path = build_text(tmp_path, n_train=300, n_eval=120)
    train = train_path.read_text(encoding="utf-8").splitlines()
    labelled = [json.loads(line) for line in labelled_path.read_text(encoding="utf-8").splitlines()]
    curve = text_bag.train_bag(objective, train, labelled, steps=60, probe_every=30)
    assert [c["step"] for c in curve] == [0, 30, 60] and {c["objective"] for c in curve} == {objective}
    assert all(0 < c["probe"] <= 1 for c in curve)
    assert text_bag.train_bag(objective, train, labelled, steps=60, probe_every=30) == curve  # seeded: repeatable

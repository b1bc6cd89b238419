"""Linear-probe evaluation, torch-free: labelled data, embedding a model file the way the server does, the probe.

    data = read_labelled("digits/")                    # a folder per class, or a JSONL/CSV manifest
    vectors = OnnxEmbedder("model.onnx").embed(data.items)   # {"last": [N, D], "target": [N, D]}
    result = linear_probe(vectors["last"], data.labels)      # accuracy, confusion, per-class recall

The probe is a standardised logistic regression (scikit-learn, fixed seed) scored by stratified k-fold
cross-validation: every item is predicted once by a probe that never saw it, so small sets give a usable figure.
scikit-learn and matplotlib come with the `eval` extra and are imported only here, when a probe or plot runs.
The checkpoint path (torch) and the `d2v-eval` command are in `d2v.eval.cli`.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from d2v_serve.backend.runner import RuntimeSettings, cpu_cores
from d2v_serve.config import ServerConfig
from d2v_serve.core.postprocess import output_options
from d2v_serve.core.preparation import prepare
from d2v_serve.core.request import EmbedOptions, Input
from d2v_serve.errors import ServeError
from d2v_serve.media import MEDIA_SUFFIXES
from d2v_serve.models.model_file import ModelFileError
from d2v_serve.models.registry import Model, load_model
from d2v_serve.preprocess import PreprocessError, collate

# The audio target space is instance-normalised over time per layer: its mean over frames is zero by construction.
AUDIO_TARGET_POOLING = "audio target space is normalised over time per utterance, so its mean over frames is 0"
Progress = Callable[[int], None]  # called with the number of items just embedded


class EvalError(ValueError):
    """Unusable data or model for an evaluation; the message is one line."""


@dataclass
class LabelledData:
    items: list[Any]  # Path (audio, image, text file) or str (text)
    labels: list[str]
    source: str = ""

    def __len__(self) -> int:
        return len(self.items)

    @property
    def classes(self) -> list[str]:
        return sorted(set(self.labels))


def read_labelled(path: str | Path, modality: str) -> LabelledData:
    """A folder with one subfolder per class (files by extension; text: one .txt file per item), or a JSONL / CSV
    manifest with `path` or `text` and `label` (relative paths are taken from the manifest's folder)."""
    path = Path(path)
    if modality not in MEDIA_SUFFIXES:
        raise EvalError(f"unknown modality {modality!r}")
    if path.is_dir():
        data = _read_folder(path, modality)
    elif path.suffix.lower() in (".jsonl", ".csv"):
        data = _read_manifest(path)
    elif not path.exists():
        raise EvalError(f"{path}: no such file or folder")
    else:
        raise EvalError(f"{path}: expected a folder per class or a .jsonl/.csv manifest")
    if len(data.classes) < 2:
        raise EvalError(f"{path}: a probe needs at least 2 classes, found {len(data.classes)}")
    counts = {c: data.labels.count(c) for c in data.classes}
    if min(counts.values()) < 2:
        raise EvalError(f"{path}: every class needs at least 2 items; {min(counts, key=counts.get)!r} has "
                        f"{min(counts.values())}")
    if any(isinstance(x, str) for x in data.items) and modality != "text":
        raise EvalError(f"{path}: has 'text' items but the model takes {modality}")
    return data


def _read_folder(root: Path, modality: str) -> LabelledData:
    items, labels = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(folder.rglob("*")):
            if f.is_file() and f.suffix.lower() in MEDIA_SUFFIXES[modality]:
                items.append(f)
                labels.append(folder.name)
    if not items:
        suffixes = ", ".join(sorted(MEDIA_SUFFIXES[modality]))
        raise EvalError(f"{root}: no {modality} files ({suffixes}) in class subfolders")
    return LabelledData(items, labels, str(root))


def _read_manifest(path: Path) -> LabelledData:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise EvalError(f"{path}: cannot read ({e.strerror})") from None
    if path.suffix.lower() == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
    else:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise EvalError(f"{path}:{n}: not JSON ({e.msg})") from None
    items, labels = [], []
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict) or row.get("label") in (None, "") or not (row.get("path") or row.get("text")):
            raise EvalError(f"{path}: item {n} needs 'label' and one of 'path' or 'text'")
        if row.get("text"):
            items.append(str(row["text"]))
        else:
            p = Path(row["path"])
            items.append(p if p.is_absolute() else path.parent / p)
        labels.append(str(row["label"]))
    if not items:
        raise EvalError(f"{path}: no items")
    return LabelledData(items, labels, str(path))


def read_item(item: Any, modality: str) -> Input:
    """One labelled item as the request input the server would receive."""
    if isinstance(item, str):
        return Input("text", item)
    try:
        data = Path(item).read_bytes()
    except OSError as e:
        raise EvalError(f"{item}: cannot read ({e.strerror})") from None
    if modality == "text":
        return Input("text", data.decode("utf-8", errors="replace").strip())
    return Input(modality, data)


def batches(n: int, size: int) -> Iterable[range]:
    for start in range(0, n, size):
        yield range(start, min(n, start + size))


def representations(modality: str) -> list[str]:
    """The pooled representations a probe can use: the last layer, and the target space except for audio."""
    return ["last"] if modality == "audio" else ["last", "target"]


class OnnxEmbedder:
    """Mean-pooled vectors of a d2v model file, through the server's own code: metadata, preprocessing, ORT
    session, valid-position slicing and pooling."""

    def __init__(self, path: str | Path, batch_size: int = 32, threads: int = 0) -> None:
        settings = RuntimeSettings(device="cpu", intra_op_threads=threads or cpu_cores())
        try:
            self.model: Model = load_model(Path(path), ServerConfig(device="cpu"), settings)
        except ModelFileError as e:
            raise EvalError(str(e)) from None
        self.modality = self.model.modality
        self.batch_size = batch_size

    def embed(self, items: Sequence[Any], progress: Progress | None = None) -> dict[str, np.ndarray]:
        finish = {r: output_options(self.model, EmbedOptions(representation=r)) for r in representations(self.modality)}
        pooled: dict[str, list[np.ndarray]] = {r: [] for r in finish}
        outputs = [f.output for f in finish.values()]
        for rows in batches(len(items), self.batch_size):
            values = [self._prepare(items[i]) for i in rows]
            feeds = collate(self.modality, values, pad_id=self.model.pad_id)
            outs = self.model.runner.run(feeds, [*outputs, "output_mask"])
            positions = np.count_nonzero(outs["output_mask"], axis=1)  # right-padded: valid rows come first
            for r, f in finish.items():
                pooled[r].extend(f.finish_batch(outs[f.output], positions))
            if progress is not None:
                progress(len(values))
        return {r: np.stack(v) for r, v in pooled.items()}

    def _prepare(self, item: Any) -> np.ndarray:
        try:
            return prepare(self.model, read_item(item, self.modality), truncate=True).value
        except ServeError as e:
            raise EvalError(f"{item}: {e.message}") from None


def prepare_item(item: Any, modality: str, preprocessing: Any) -> np.ndarray:
    """One item through the torch-free preprocessing, for embedders that do not run an ONNX file (checkpoints)."""
    from d2v_serve.preprocess import decode_audio, decode_image

    inp = read_item(item, modality)
    try:
        if modality == "text":
            return preprocessing.prepare(inp.value, truncate=True)
        if modality == "image":
            return preprocessing.prepare(decode_image(inp.value))
        waveform, rate = decode_audio(inp.value)
        return preprocessing.prepare(waveform, rate)
    except PreprocessError as e:
        raise EvalError(f"{item}: {e}") from None


# ------------------------------------------------------------------------------------------------------- probe


@dataclass
class ProbeResult:
    accuracy: float
    fold_accuracies: list[float]
    classes: list[str]
    confusion: list[list[int]]  # rows: true class, columns: predicted class
    folds: int
    chance: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def recall(self) -> dict[str, float]:
        return {c: row[i] / max(1, sum(row)) for i, (c, row) in enumerate(zip(self.classes, self.confusion,
                                                                               strict=True))}

    def top_confusions(self, n: int = 3) -> list[tuple[str, str, int]]:
        pairs = [(self.classes[i], self.classes[j], v) for i, row in enumerate(self.confusion)
                 for j, v in enumerate(row) if i != j and v > 0]
        return sorted(pairs, key=lambda p: -p[2])[:n]

    def to_dict(self) -> dict[str, Any]:
        return {"accuracy": round(self.accuracy, 4), "fold_accuracies": [round(a, 4) for a in self.fold_accuracies],
                "folds": self.folds, "chance": round(self.chance, 4), "classes": self.classes,
                "confusion": self.confusion, "recall": {c: round(r, 4) for c, r in self.recall.items()}}


def linear_probe(features: np.ndarray, labels: Sequence[str], seed: int = 0, folds: int = 5) -> ProbeResult:
    """Standardised logistic regression, scored by stratified k-fold cross-validation (shuffled with `seed`)."""
    try:
        from sklearn.linear_model import LogisticRegression
        from sklearn.metrics import confusion_matrix
        from sklearn.model_selection import StratifiedKFold
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
    except ImportError:
        raise EvalError("the probe needs scikit-learn: pip install 'd2v[eval]'") from None
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    if not np.isfinite(x).all():
        raise EvalError("embeddings contain NaN or inf")
    classes = sorted(set(y.tolist()))
    k = max(2, min(folds, min(int((y == c).sum()) for c in classes)))
    predicted = np.empty_like(y)
    fold_acc = []
    for train, test in StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(x, y):
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, random_state=seed))
        probe.fit(x[train], y[train])
        predicted[test] = probe.predict(x[test])
        fold_acc.append(float((predicted[test] == y[test]).mean()))
    confusion = confusion_matrix(y, predicted, labels=classes).tolist()
    chance = max(float((y == c).mean()) for c in classes)
    return ProbeResult(float((predicted == y).mean()), fold_acc, classes, confusion, k, chance)


# ------------------------------------------------------------------------------------------------------ report


def format_report(results: dict[str, dict[str, ProbeResult]], n_items: int) -> str:
    """Side-by-side accuracies (one column per model, one row per representation) and a confusion summary."""
    models = list(results)
    reps = [r for r in ("last", "target") if any(r in results[m] for m in models)]
    first = results[models[0]][reps[0]]
    lines = [f"linear probe: {n_items} items, {len(first.classes)} classes, {first.folds}-fold CV "
             f"(chance {first.chance:.3f})",
             f"{'representation':<16}" + "".join(f"{m:>14}" for m in models)]
    for r in reps:
        cells = [f"{results[m][r].accuracy:>14.3f}" if r in results[m] else f"{'n/a':>14}" for m in models]
        lines.append(f"{r:<16}" + "".join(cells))
    for m in models:
        best = max(results[m].values(), key=lambda p: p.accuracy)
        recall = ", ".join(f"{c} {v:.2f}" for c, v in best.recall.items())
        confused = "; ".join(f"{t}->{p} {n}" for t, p, n in best.top_confusions()) or "none"
        lines.append(f"{m}: recall per class ({_rep_name(results[m], best)}): {recall}")
        lines.append(f"{m}: most confused (true->predicted count): {confused}")
    return "\n".join(lines)


def _rep_name(by_rep: dict[str, ProbeResult], result: ProbeResult) -> str:
    return next(r for r, p in by_rep.items() if p is result)


def pca_plot(embeddings: dict[str, np.ndarray], labels: Sequence[str], path: str | Path, title: str = "") -> Path:
    """2-D PCA of each model's vectors, side by side, coloured by label; written as PNG (matplotlib, Agg)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from sklearn.decomposition import PCA
        from sklearn.preprocessing import StandardScaler
    except ImportError:
        raise EvalError("--plot needs matplotlib and scikit-learn: pip install 'd2v[eval]'") from None
    y = np.asarray(labels)
    classes = sorted(set(y.tolist()))
    colours = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    fig, axes = plt.subplots(1, len(embeddings), figsize=(4.2 * len(embeddings), 4), squeeze=False)
    for ax, (name, x) in zip(axes[0], embeddings.items(), strict=True):
        xy = PCA(n_components=2, random_state=0).fit_transform(StandardScaler().fit_transform(x))
        for i, c in enumerate(classes):
            sel = y == c
            ax.scatter(xy[sel, 0], xy[sel, 1], s=6, alpha=0.7, color=colours(i % colours.N), label=c)
        ax.set_title(name, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][-1].legend(fontsize=7, markerscale=2, loc="best", framealpha=0.6)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=72)
    plt.close(fig)
    return path

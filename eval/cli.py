"""d2v-eval: linear-probe accuracy of a d2v checkpoint or model file on labelled data.

    d2v-eval runs/image/ckpt.pt digits/ --baseline            # pretrained beside the same preset's initial weights
    d2v-eval models/text.onnx topics.jsonl --json --plot pca.png

MODEL is a d2v checkpoint (.pt, needs torch) or an exported model file (.onnx, run through the server's own
preprocessing and ONNX Runtime code; no torch). DATA is a folder with one subfolder per class, or a JSONL/CSV
manifest with `path` or `text` and `label`. Each item is embedded (mean-pooled last layer, and the data2vec target
space except for audio, whose target space averages to zero over time), then a standardised logistic regression is
scored by stratified 5-fold cross-validation (seed 0): each item is predicted by a probe that did not see it.

`--baseline` also probes the initial weights of the same preset: for a checkpoint, the weights `d2v-train` started
from (its config and seed, exactly what `d2v-train --steps 0` writes); for a model file, pass the initial weights
(`--baseline INIT.pt` or `.onnx`). Python: `evaluate(model, data, baseline=...)` returns the report dict.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from d2v_serve.console import add_version
from d2v_serve.models.model_file import ModelFileError, read_metadata

from .probe import (
    EvalError,
    LabelledData,
    OnnxEmbedder,
    Progress,
    batches,
    format_report,
    linear_probe,
    pca_plot,
    prepare_item,
    read_labelled,
    representations,
)

AUTO = "auto"  # --baseline without a path: the checkpoint's own initial weights


class CheckpointEmbedder:
    """Mean-pooled vectors of a torch encoder (a checkpoint's weights, or its run's initial weights)."""

    def __init__(self, ckpt: dict[str, Any], initial: bool = False, batch_size: int = 32) -> None:
        import torch  # noqa: F401 - only checkpoints need torch

        from d2v.training.checkpoint import encoder_config, initial_encoder, load_encoder, run_start
        from d2v_serve.preprocess import preprocessing_from_dict

        self.cfg = encoder_config(ckpt)
        self.modality = ckpt["modality"]
        self.encoder = initial_encoder(self.cfg, **run_start(ckpt)).eval() if initial else load_encoder(ckpt)
        self.preprocessing = preprocessing_from_dict(self.modality, ckpt["preprocessing"])
        self.batch_size = batch_size

    def embed(self, items: Sequence[Any], progress: Progress | None = None) -> dict[str, np.ndarray]:
        import torch

        from d2v.training.pooling import masked_mean
        from d2v.training.targets import target_representation
        from d2v_serve.preprocess import collate

        names = representations(self.modality)
        pooled: dict[str, list[np.ndarray]] = {r: [] for r in names}
        pad_id = int(getattr(self.preprocessing, "pad_id", 1))
        for rows in batches(len(items), self.batch_size):
            values = [prepare_item(items[i], self.modality, self.preprocessing) for i in rows]
            feeds = {k: torch.from_numpy(v) for k, v in collate(self.modality, values, pad_id=pad_id).items()}
            with torch.no_grad():
                out = self.encoder(**feeds)
                hidden = {"last": out.last_hidden_state.float()}
                if "target" in names:
                    hidden["target"] = target_representation(out, self.cfg)
                for r in names:
                    mean = masked_mean(hidden[r].double(), out.valid_mask)
                    pooled[r].extend(mean.float().numpy())
            if progress is not None:
                progress(len(values))
        return {r: np.stack(v) for r, v in pooled.items()}


def embedder(model: str | Path, initial: bool = False, batch_size: int = 32) -> Any:
    """An embedder for a checkpoint (torch) or a model file (ONNX Runtime); `initial`: the run's initial weights."""
    path = Path(model)
    if not path.is_file():
        raise EvalError(f"{path}: no such file")
    if _is_model_file(path):
        if initial:
            raise EvalError(f"{path}: a model file does not say how its run started; pass the initial weights "
                            "(--baseline INIT.pt from d2v-train --steps 0, or its export)")
        return OnnxEmbedder(path, batch_size)
    try:
        from d2v.training.checkpoint import CheckpointError, load_checkpoint
    except ImportError:
        raise EvalError(f"{path}: evaluating a checkpoint needs torch (pip install 'd2v[train,eval]'), or "
                        "export it and pass the .onnx file") from None
    try:
        ckpt = load_checkpoint(path)
        return CheckpointEmbedder(ckpt, initial=initial, batch_size=batch_size)
    except CheckpointError as e:
        raise EvalError(str(e)) from None


def _is_model_file(path: Path) -> bool:
    if path.suffix.lower() == ".onnx":
        return True
    try:
        read_metadata(path)
    except ModelFileError:
        return False
    return True


def evaluate(model: str | Path, data: str | Path | LabelledData, baseline: str | Path | None = None,
             plot: str | Path | None = None, seed: int = 0, folds: int = 5, batch_size: int = 32,
             progress: bool = False) -> dict[str, Any]:
    """Probe `model` (and the initial weights when `baseline` is AUTO or a path) on labelled `data`.

    Returns {"models": {"pretrained": {...}, "initial": {...}}, "items", "classes", "protocol", "plot"}: per model,
    per representation, the ProbeResult as a dict."""
    models = {"pretrained": embedder(model, batch_size=batch_size)}
    if baseline is not None:
        initial = baseline == AUTO
        models["initial"] = embedder(model if initial else baseline, initial=initial, batch_size=batch_size)
    modalities = {m.modality for m in models.values()}
    if len(modalities) > 1:
        raise EvalError(f"the model and its baseline differ in modality: {', '.join(sorted(modalities))}")
    modality = modalities.pop()
    labelled = data if isinstance(data, LabelledData) else read_labelled(data, modality)
    results, vectors = {}, {}
    for name, emb in models.items():
        vectors[name] = emb.embed(labelled.items, _bar(len(labelled), f"embed {name}", progress))
        results[name] = {r: linear_probe(v, labelled.labels, seed=seed, folds=folds)
                         for r, v in vectors[name].items()}
    report: dict[str, Any] = {
        "modality": modality, "items": len(labelled), "classes": labelled.classes, "data": labelled.source,
        "protocol": {"probe": "StandardScaler + LogisticRegression", "cv": "stratified k-fold", "seed": seed,
                     "pooling": "mean over valid positions"},
        "models": {name: {r: p.to_dict() for r, p in by_rep.items()} for name, by_rep in results.items()},
        "report": format_report(results, len(labelled)),
    }
    if modality == "audio":
        report["protocol"]["target"] = "not probed: the audio target space averages to zero over time"
    if plot is not None:
        report["plot"] = str(pca_plot({f"{n} (last layer)": v["last"] for n, v in vectors.items()},
                                      labelled.labels, plot, title=f"{modality}: PCA of mean-pooled vectors"))
    return report


def _bar(total: int, desc: str, enabled: bool) -> Progress | None:
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    bar = tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=False)

    def update(n: int) -> None:
        bar.update(n)
        if bar.n >= total:
            bar.close()
    return update


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="d2v-eval", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n")[2:]))
    p.add_argument("model", help="d2v checkpoint (.pt) or model file (.onnx)")
    p.add_argument("data", help="folder per class, or a .jsonl/.csv manifest (path or text, label)")
    p.add_argument("--baseline", nargs="?", const=AUTO, metavar="INIT",
                   help="also probe the initial weights (a checkpoint's own run start, or the file INIT)")
    p.add_argument("--plot", nargs="?", const="", metavar="PNG",
                   help="write a 2-D PCA coloured by label (default: MODEL's folder, <model>-pca.png)")
    p.add_argument("--json", nargs="?", const="-", metavar="FILE", help="write the report as JSON (- : stdout)")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    p.add_argument("--seed", type=int, default=0, help="fold shuffling and probe seed (default 0)")
    p.add_argument("--batch-size", type=int, default=32, help="items per forward pass (default 32)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_version(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    plot = args.plot
    if plot == "":
        plot = Path(args.model).with_name(Path(args.model).stem + "-pca.png")
    try:
        if args.folds < 2 or args.batch_size < 1:
            raise EvalError("--folds must be >= 2 and --batch-size >= 1")
        report = evaluate(args.model, args.data, baseline=args.baseline, plot=plot, seed=args.seed,
                          folds=args.folds, batch_size=args.batch_size, progress=not args.no_progress)
    except (EvalError, OSError) as e:
        print(f"d2v-eval: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    if args.json == "-":
        print(json.dumps({k: v for k, v in report.items() if k != "report"}, indent=2))
        print(report["report"], file=sys.stderr)
    else:
        print(report["report"])
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        if plot is not None:
            print(f"plot: {report['plot']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

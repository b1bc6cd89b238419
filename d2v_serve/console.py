"""What every d2v console script shares: `--version` from the installed package's metadata, and the entry points of
the scripts that need an optional extra. Those import their module only when run, so in the serving install
(`pip install d2v`, no torch) they exit 2 with one line naming the extra instead of a traceback."""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib.metadata import PackageNotFoundError, version

DISTRIBUTION = "d2v"

# The modules each extra brings (import names of pyproject's optional dependencies; tests/test_packaging.py checks).
EXTRA_MODULES = {
    "train": {"torch", "safetensors", "tqdm", "yaml", "matplotlib"},
    "export": {"torch", "onnx", "onnxscript", "onnxconverter_common"},
    "eval": {"sklearn", "matplotlib", "tqdm"},
}


def package_version() -> str:
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:  # imported from a source tree that was never installed
        return "unknown (not installed)"


def add_version(parser: argparse.ArgumentParser) -> None:
    """`PROG --version` prints `PROG X.Y.Z` and exits 0."""
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")


def run_with_extra(module: str, prog: str, extra: str, argv: list[str] | None = None) -> int:
    """`module.main(argv)`, or exit status 2 and one line when a module of the `extra` is missing."""
    try:
        return importlib.import_module(module).main(argv)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in EXTRA_MODULES[extra]:
            raise
        name = "training" if extra == "train" else extra
        print(f"{prog} needs the {name} extra: pip install 'd2v[{extra}]'", file=sys.stderr)
        return 2


def train_main(argv: list[str] | None = None) -> int:
    return run_with_extra("d2v.training.cli", "d2v-train", "train", argv)


def import_hf_main(argv: list[str] | None = None) -> int:
    return run_with_extra("d2v.training.import_hf", "d2v-import-hf", "train", argv)


def export_main(argv: list[str] | None = None) -> int:
    return run_with_extra("d2v.export.cli", "d2v-export", "export", argv)


def eval_main(argv: list[str] | None = None) -> int:
    return run_with_extra("d2v.eval.cli", "d2v-eval", "eval", argv)

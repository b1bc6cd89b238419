"""What every d2v console script shares: `--version` from the installed package's metadata, and the entry points of
the scripts that need an optional extra. Those import their module only when run, so in the serving install
(`pip install d2v`, no torch) they exit 2 with one line naming the extra instead of a traceback."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from importlib.metadata import PackageNotFoundError, version

DISTRIBUTION = "d2v"

# The modules each extra brings (import names of pyproject's optional dependencies; tests/test_packaging.py checks).
EXTRA_MODULES = {
    "train": {"torch", "safetensors", "tqdm", "yaml", "matplotlib"},
    "export": {"torch", "onnx", "onnxscript", "onnxconverter_common"},
    "eval": {"sklearn", "matplotlib", "tqdm"},
    "bulk": {"pyarrow", "tqdm"},
}


def package_version() -> str:
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:  # imported from a source tree that was never installed
        return "unknown (not installed)"


def add_version(parser: argparse.ArgumentParser) -> None:
    """`PROG --version` prints `PROG X.Y.Z` and exits 0."""
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")


def run_with_extra(module: str, prog: str, extra: str, argv: list[str] | None = None, *,
                   checked: bool = False) -> int:
    """`module.main(argv)`, or exit status 2 and one line when a module of the `extra` is missing. `checked`:
    look for every module of the extra first (for a command that imports them only once it has work to do)."""
    name = "training" if extra == "train" else extra
    missing = sorted(m for m in EXTRA_MODULES[extra] if checked and importlib.util.find_spec(m) is None)
    try:
        if missing:
            raise ModuleNotFoundError(name=missing[0])
        return importlib.import_module(module).main(argv)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in EXTRA_MODULES[extra]:
            raise
        print(f"{prog} needs the {name} extra: pip install 'd2v[{extra}]'", file=sys.stderr)
        return 2


def train_main(argv: list[str] | None = None) -> int:
    return run_with_extra("d2v.training.cli", "d2v-train", "train", argv)


def import_hf_main(argv: list[str] | None = None) -> int:
    return run_with_extra("d2v.training.import_hf", "d2v-import-hf", "train", argv)


def export_main(argv: list[str] | None = None) -> int:
    return run_with_extra("d2v.export.cli", "d2v-export", "export", argv)


def bulk_main(argv: list[str] | None = None) -> int:
    return run_with_extra("d2v_serve.bulk.cli", "d2v-bulk", "bulk", argv, checked=True)


def eval_main(argv: list[str] | None = None) -> int:
    return run_with_extra("d2v.eval.cli", "d2v-eval", "eval", argv)

"""d2v-export CKPT -o model.onnx [--fp16 | --int8] [--no-fuse]: progress on stderr, one summary line on stdout."""

from __future__ import annotations

import argparse
import json
import os
import sys

from d2v.training.checkpoint import CheckpointError
from d2v_serve.console import add_version

from .graph import OPSET, ExportError
from .pipeline import ParityError, export_model

EXIT_ERROR = 1  # unusable checkpoint, exporter failure, bad arguments to the exporter
EXIT_PARITY = 3  # the graph was built but failed verification


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="d2v-export",
        description="Export a d2v checkpoint to one ONNX model file, verified against torch with ONNX Runtime. "
                    "Nothing is written unless every check passes.")
    parser.add_argument("checkpoint", help="d2v checkpoint (.pt) from d2v-train or d2v-import-hf")
    parser.add_argument("-o", "--output", required=True, help="model file to write (.onnx)")
    variant = parser.add_mutually_exclusive_group()
    variant.add_argument("--fp16", action="store_true",
                         help="float16 graph for the CUDA provider (float32 inputs and outputs)")
    variant.add_argument("--int8", action="store_true",
                         help="int8 dynamic quantization of the MatMul weights, for CPU serving")
    parser.add_argument("--no-fuse", action="store_true",
                        help="keep the plain exported graph (no onnxruntime contrib-op fusions of attention, GELU "
                             "and residual layer norms)")
    parser.add_argument("--opset", type=int, default=OPSET, help=f"ONNX opset, {OPSET} or newer (default {OPSET})")
    parser.add_argument("--report", metavar="JSON", help="also write the full export report to this file")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    parser.add_argument("--tolerance", type=float, default=None, help=argparse.SUPPRESS)
    add_version(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def progress(message: str) -> None:
        if not args.quiet:
            print(f"d2v-export: {message}", file=sys.stderr, flush=True)

    try:
        report = export_model(args.checkpoint, args.output, fp16=args.fp16, int8=args.int8, fuse=not args.no_fuse,
                              progress=progress, tolerance=args.tolerance, opset=args.opset)
    except ParityError as e:
        print(f"d2v-export: error: {e}; no file written", file=sys.stderr)
        return EXIT_PARITY
    except (CheckpointError, ExportError, OSError) as e:
        print(f"d2v-export: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as e:  # noqa: BLE001 - a bug: one line, the traceback on request
        if os.environ.get("D2V_EXPORT_DEBUG"):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"d2v-export: error: internal error {type(e).__name__}: {first} (set D2V_EXPORT_DEBUG=1 for the "
              "traceback)", file=sys.stderr)
        return EXIT_ERROR
    if args.report:
        with open(args.report, "w", encoding="utf-8") as f:
            json.dump({k: v for k, v in report.items() if k != "metadata"}, f, indent=2)
    print(report["summary"], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

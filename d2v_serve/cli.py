"""Console scripts: `d2v-serve` (the server) and `d2v-embed` (a client: files or text in, .npy/.npz/JSON out)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .console import add_version

DEMO_MODELS = Path(__file__).resolve().parent / "demo_models"


def serve_main(argv: Sequence[str] | None = None) -> int:
    from .config import parse_config
    from .logs import setup_logging
    from .models.model_file import ModelFileError
    from .server import Server
    from .tracing import tracing_from_config

    try:
        config = parse_config(argv)
        tracing = tracing_from_config(config)
    except ValueError as exc:
        print(f"d2v-serve: {exc}", file=sys.stderr)
        return 2
    models = Path(config.models) if config.models else DEMO_MODELS
    if not config.models and not any(DEMO_MODELS.glob("*.onnx")):
        print(f"d2v-serve: no --models given and no bundled demo models in {DEMO_MODELS}; pass --models DIR",
              file=sys.stderr)
        return 2
    setup_logging(config.log_level, config.log_format)
    try:
        return asyncio.run(Server(config, models, tracing).run())
    except (ModelFileError, OSError, ValueError, RuntimeError) as exc:
        print(f"d2v-serve: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _embed_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="d2v-embed", description="Embed files or text with a d2v server.")
    p.add_argument("inputs", nargs="*", help="audio/image files, or strings with --text; '-' reads text lines "
                                             "from stdin")
    p.add_argument("--server", default=os.environ.get("D2V_SERVER", "localhost:50051"),
                   help="host:port [env D2V_SERVER; default localhost:50051]")
    p.add_argument("--model", default="", help="model name (default: the server's only model for the modality)")
    p.add_argument("--text", action="store_true", help="the inputs are strings, not files")
    p.add_argument("--pooling", choices=("mean", "cls", "none"), default="mean")
    p.add_argument("--normalize", action="store_true", help="L2-normalise the vectors")
    p.add_argument("--representation", choices=("last", "target"), default="last",
                   help="last layer, or the data2vec target space")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    p.add_argument("--truncate", action="store_true", help="cut over-long inputs instead of failing")
    p.add_argument("--chunk", action="store_true", help="embed long audio and text in overlapping windows, joined "
                                                        "into one embedding each (instead of failing or cutting)")
    p.add_argument("--window", type=float, default=0.0, help="with --chunk: window length, audio in seconds, text in "
                                                             "tokens (default: the model's)")
    p.add_argument("--overlap", type=float, default=None, help="with --chunk: overlap, audio in seconds (default "
                                                               "1), text in tokens (default 64)")
    p.add_argument("-o", "--output", help="out.npy (stacked: inputs first), out.npz (one array per input) or out.json; "
                                          "default: JSON on stdout")
    p.add_argument("--batch-size", type=int, default=32, help="inputs per request message")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds for the whole run")
    p.add_argument("--token", default=os.environ.get("D2V_AUTH_TOKEN", ""), help="bearer token [env D2V_AUTH_TOKEN]")
    p.add_argument("--tls", action="store_true", help="connect with TLS (system roots unless --ca)")
    p.add_argument("--ca", help="PEM root certificates for TLS")
    p.add_argument("--list-models", action="store_true", help="print the served models as JSON and exit")
    add_version(p)
    return p


def _collect_inputs(args: argparse.Namespace) -> tuple[list[object], list[str]]:
    """The inputs to send and a display name for each (the file path as given, the text, or stdin:N)."""
    from .client import Audio, Image, file_modality
    from .media import MEDIA_SUFFIXES

    items: list[object] = []
    names: list[str] = []
    for arg in args.inputs:
        if arg == "-":
            lines = [line.rstrip("\n") for line in sys.stdin if line.strip()]
            items += lines
            names += [f"stdin:{i}" for i in range(len(lines))]
        elif args.text:
            items.append(arg)
            names.append(arg)
        else:
            path = Path(arg)
            if not path.is_file():
                raise ValueError(f"no such file: {arg} (use --text to embed strings)")
            data = path.read_bytes()
            try:
                modality = file_modality(path, data)
            except ValueError:
                hint = "; use --text to embed strings, or '-' to embed stdin's lines" if path.suffix.lower() in \
                    MEDIA_SUFFIXES["text"] else ""
                raise ValueError(f"input {len(items)}: not an audio or image file (unknown suffix and header) "
                                 f"({arg}){hint}") from None
            items.append(Audio(data) if modality == "audio" else Image(data))
            names.append(arg)
    if not items:
        raise ValueError("nothing to embed: give files, or strings with --text, or '-' for stdin lines")
    return items, names


def npz_keys(items: list[object], names: list[str]) -> list[str]:
    """One .npz key per input: a file's path as given, text_0, text_1, ... for texts; a repeated path gets #2, #3."""
    keys: list[str] = []
    texts = 0
    for item, name in zip(items, names, strict=True):
        if isinstance(item, str):
            key, texts = f"text_{texts}", texts + 1
        else:
            key = name
            repeat = 1
            while key in keys:
                repeat += 1
                key = f"{name}#{repeat}"
        keys.append(key)
    return keys


def _groups(items: list[object], by_modality: bool) -> list[list[int]]:
    """Indices of the inputs to send together: all of them, or one list per modality (in first-seen order)."""
    from .client import Audio, Image

    if not by_modality:
        return [list(range(len(items)))]
    groups: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        modality = "audio" if isinstance(item, Audio) else "image" if isinstance(item, Image) else "text"
        groups.setdefault(modality, []).append(i)
    return list(groups.values())


def _write(arrays: list[np.ndarray], items: list[object], names: list[str], output: str | None) -> None:
    if output and output.endswith(".npy"):
        if len({a.shape for a in arrays}) != 1:
            raise ValueError("outputs differ in shape (pooling none?): write .npz or .json instead")
        np.save(output, np.stack(arrays))  # always (inputs, ...), even for one input
    elif output and output.endswith(".npz"):
        np.savez(output, **dict(zip(npz_keys(items, names), arrays, strict=True)))
    else:
        doc = [{"input": n, "shape": list(a.shape), "embedding": a.astype(np.float32).tolist()}
               for n, a in zip(names, arrays, strict=True)]
        text = json.dumps(doc)
        if output:
            Path(output).write_text(text + "\n")
        else:
            print(text)


def embed_main(argv: Sequence[str] | None = None) -> int:
    from .client import Client, EmbedError

    parser = _embed_parser()
    args = parser.parse_args(argv)
    if (args.window or args.overlap is not None) and not args.chunk:
        parser.error("--window and --overlap need --chunk")
    root = Path(args.ca).read_bytes() if args.ca else None
    names: list[str] = []
    try:
        with Client(args.server, token=args.token or None, tls=args.tls, root_certificates=root,
                    timeout=args.timeout) as client:
            if args.list_models:
                models = client.list_models()
                for m in models:
                    m.pop("metadata")
                print(json.dumps(models, indent=2))
                return 0
            items, names = _collect_inputs(args)
            arrays: list[np.ndarray] = [np.empty(0)] * len(items)
            # Without --model, each modality goes to the server's model for it, so audio and images can be mixed.
            for indices in _groups(items, by_modality=not args.model):
                try:
                    vectors = client.embed_stream(
                        [items[i] for i in indices], args.model, batch_size=args.batch_size, timeout=args.timeout,
                        pooling=args.pooling, normalize=args.normalize, representation=args.representation,
                        dtype=args.dtype, truncate=args.truncate, chunk=args.chunk, window=args.window,
                        overlap=args.overlap)
                    for i, vector in zip(indices, vectors, strict=True):
                        arrays[i] = vector
                except EmbedError as exc:
                    if not 0 <= exc.input_index < len(indices):
                        raise
                    index = indices[exc.input_index]
                    raise EmbedError(exc.code, f"input {index}: {exc.message.partition(': ')[2]}", index) from None
        _write(arrays, items, names, args.output)
    except EmbedError as exc:
        where = f" ({names[exc.input_index]})" if 0 <= exc.input_index < len(names) else ""
        print(f"d2v-embed: {exc}{where}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as exc:
        print(f"d2v-embed: {exc}", file=sys.stderr)
        return 1
    return 0

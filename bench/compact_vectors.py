"""How much of float32's nearest-neighbour ranking each compact encoding keeps: `d2v-serve` on a text model, a
generated corpus embedded once per encoding over gRPC, and for each query the overlap of its top-k neighbours under
that encoding with its top-k under float32 (cosine for floats, int8 and uint8; Hamming distance for the binary
encodings), with the bytes per vector.

    python -m bench.compact_vectors                      # the bundled demo-text model, 4000 texts, 500 queries
    python -m bench.compact_vectors --model models/text.onnx --corpus 20000 --queries 1000
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from bench import report
from bench.server import D2vServer
from bench.workloads import texts
from d2v_serve.cli import DEMO_MODELS
from d2v_serve.client import Client
from d2v_serve.core.postprocess import COMPACT
from d2v_serve.models.model_file import read_metadata


def similarities(vectors: np.ndarray, queries: np.ndarray, encoding: str) -> np.ndarray:
    """[queries, corpus] similarity under an encoding's own comparison (higher is nearer)."""
    if encoding in ("binary", "ubinary"):
        bits = np.unpackbits(vectors.view(np.uint8), axis=-1).astype(np.float32)
        # Hamming distance = ones(q) + ones(v) - 2 q.v; its negative ranks like similarity
        q = bits[queries]
        return 2 * q @ bits.T - bits.sum(axis=1)[None, :] - q.sum(axis=1)[:, None]
    x = vectors.astype(np.float32) - (128 if encoding == "uint8" else 0)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x[queries] @ x.T


def top_k(sims: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    sims = sims.copy()
    sims[np.arange(len(queries)), queries] = -np.inf  # a text is not its own neighbour
    return np.argsort(-sims, axis=1, kind="stable")[:, :k]


def overlap(reference: np.ndarray, other: np.ndarray) -> float:
    k = reference.shape[1]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(reference, other, strict=True)]))


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.compact_vectors", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=DEMO_MODELS / "demo-text.onnx", help="a text model file")
    p.add_argument("--corpus", type=int, default=4000, help="generated texts")
    p.add_argument("--queries", type=int, default=500, help="texts of the corpus used as queries")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--tokens", type=int, default=24, help="tokens per text")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write-docs", action="store_true", help="write the table into docs/benchmarks.md")
    args = p.parse_args()
    if args.write_docs:
        report.check_doc_sections(["compact_vectors"])

    meta = read_metadata(args.model)
    rng = np.random.default_rng(args.seed)
    corpus = texts(meta, args.tokens, args.corpus, rng)
    queries = rng.choice(args.corpus, size=args.queries, replace=False)
    name = args.model.stem
    vectors: dict[str, np.ndarray] = {}
    with D2vServer([args.model]) as server, Client(server.target) as client:
        for encoding in ("float32", *COMPACT):
            out = []
            for i in range(0, len(corpus), 256):
                out += client.embed(corpus[i: i + 256], name, normalize=True, dtype=encoding)
            vectors[encoding] = np.stack(out)
    reference = top_k(similarities(vectors["float32"], queries, "float32"), queries, args.k)
    rows = []
    for encoding, v in vectors.items():
        found = top_k(similarities(v, queries, encoding), queries, args.k)
        rows.append({"encoding": encoding, "bytes": int(v.shape[1] * v.itemsize),
                     f"top{args.k}_overlap": round(overlap(reference, found), 3)})
    print(f"model {name} (hidden {meta.hidden_size}), {args.corpus} texts of {args.tokens} tokens, "
          f"{args.queries} queries, seed {args.seed}")
    table = report.markdown_table(["encoding", "bytes per vector", f"top-{args.k} overlap with float32"],
                                  [[row["encoding"], row["bytes"], str(row[f"top{args.k}_overlap"])] for row in rows])
    print(table)
    print(json.dumps(rows))
    if args.write_docs:
        report.write_doc_sections({"compact_vectors": table})


if __name__ == "__main__":
    main()

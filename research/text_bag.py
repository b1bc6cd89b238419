"""Is it the regression objective? The topic corpus on the simplest model that can learn topics (docs/research.md).

    .venv/bin/python -m research.text_bag --out runs/text-bag                 # every objective, JSON to OUT/bag.json
    .venv/bin/python -m research.text_bag --out runs/text-bag ce regress-random

A bag-of-words model (word2vec's CBOW): a masked word is predicted from the mean of the embeddings of the visible
words of its document, through a two-layer head (as data2vec's text head), on bench/quality.py's topic corpus with
data2vec's text masking rate (15 %; `--mask-prob`), batch 32, AdamW at 3e-3, cosine with 1 % warmup. A document's
vector is the mean of its words' embeddings, probed like the models' (`d2v.eval.probe.linear_probe`). Only the
objective changes between rows:
- `ce`: cross-entropy over the vocabulary (tied embeddings): masked language modelling;
- `regress-random`: squared error onto a fixed random code per word (layer-normalised): what data2vec regresses
  onto at a `tiny` teacher's initial weights, where each target is nearly a random code of the token there;
- `regress-ema`, `regress-ema-bn`: onto the codes of a moving teacher instead, the EMA (0.99) of the embeddings,
  layer-normalised or normalised per dimension over the batch (no collapse to one code): bootstrapping.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

OBJECTIVES = ("ce", "regress-random", "regress-ema", "regress-ema-bn")
WIDTH = 64  # tiny's
EMA = 0.99


def train_bag(objective: str, train: list[str], labelled: list[dict], steps: int = 3000, probe_every: int = 1000,
              seed: int = 1, lr: float = 3e-3, mask_prob: float = 0.15) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from d2v.eval.probe import linear_probe

    torch.manual_seed(seed)
    rng = random.Random(seed)
    words = sorted({w for doc in train + [r["text"] for r in labelled] for w in doc.split()})
    index = {w: i + 1 for i, w in enumerate(words)}  # 0: padding
    embed = torch.nn.Embedding(len(index) + 1, WIDTH, padding_idx=0)
    torch.nn.init.normal_(embed.weight, 0.0, 0.02)  # d2v-train's init_std
    head = torch.nn.Sequential(torch.nn.Linear(WIDTH, 2 * WIDTH), torch.nn.GELU(), torch.nn.Linear(2 * WIDTH, WIDTH))
    bias = torch.nn.Parameter(torch.zeros(len(index) + 1))
    params = [*embed.parameters(), *head.parameters(), bias]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)
    codes = F.layer_norm(torch.randn(len(index) + 1, WIDTH), (WIDTH,))
    teacher = embed.weight.detach().clone()

    def ids(docs: list[str]) -> torch.Tensor:
        rows = [[index[w] for w in d.split()] for d in docs]
        out = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
        for i, row in enumerate(rows):
            out[i, :len(row)] = torch.tensor(row)
        return out

    probe_ids = ids([r["text"] for r in labelled])
    labels = [r["label"] for r in labelled]

    def probe(step: int) -> dict:
        with torch.no_grad():
            valid = probe_ids.ne(0).unsqueeze(-1).float()
            docs = (embed(probe_ids) * valid).sum(1) / valid.sum(1)
        return {"objective": objective, "step": step, "probe": round(linear_probe(docs.numpy(), labels).accuracy, 3)}

    curve = [probe(0)]
    warmup = max(1, steps // 100)
    for step in range(1, steps + 1):
        now = lr * min(1.0, step / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = now
        x = ids(rng.sample(train, 32))
        valid = x.ne(0)
        mask = (torch.rand(x.shape) < mask_prob) & valid
        visible = (valid & ~mask).unsqueeze(-1).float()
        context = (embed(x) * visible).sum(1) / visible.sum(1).clamp_min(1)  # [B, D]
        rows = mask.nonzero(as_tuple=True)[0]
        pred = head(context[rows])
        target_ids = x[mask]
        if objective == "ce":
            loss = F.cross_entropy(pred @ embed.weight.T + bias, target_ids)
        else:
            if objective == "regress-random":
                target = codes[target_ids]
            elif objective == "regress-ema":
                target = F.layer_norm(teacher[target_ids], (WIDTH,))
            else:
                target = teacher[target_ids]
                target = (target - target.mean(0)) / (target.std(0) + 1e-5)
            loss = ((pred - target) ** 2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            teacher.mul_(EMA).add_(embed.weight, alpha=1 - EMA)
        if step % probe_every == 0:
            curve.append(probe(step))
    return curve


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("objectives", nargs="*", default=list(OBJECTIVES), help=f"any of {', '.join(OBJECTIVES)}")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--mask-prob", type=float, default=0.15, help="masked fraction of the words (data2vec text: 0.15)")
    args = p.parse_args()
    unknown = sorted(set(args.objectives) - set(OBJECTIVES))
    if unknown:
        p.error(f"unknown objective {', '.join(unknown)}; choose from {', '.join(OBJECTIVES)}")
    from text_screen import corpus

    train_path, labelled_path = corpus(args.out, "topics")
    train = train_path.read_text(encoding="utf-8").splitlines()
    labelled = [json.loads(line) for line in labelled_path.read_text(encoding="utf-8").splitlines()]
    results = []
    for objective in args.objectives:
        curve = train_bag(objective, train, labelled, steps=args.steps, seed=args.seed, lr=args.lr,
                          mask_prob=args.mask_prob)
        print(objective, " ".join(f"{c['step']}:{c['probe']}" for c in curve), flush=True)
        results.append({"objective": objective, "curve": curve})
    (args.out / "bag.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Prepared inputs to batch items, and the items' results back to each input's Embedding and the call's result."""

from __future__ import annotations

from ..models.registry import Model
from .batcher import Item, ItemResult
from .chunking import ChunkPlan, WindowPart, join
from .postprocess import OutputOptions
from .preparation import Prepared
from .request import EmbedRequest
from .results import Embedding, EmbedResult, Timings, Usage, WindowResult


def batch_items(model: Model, p: Prepared, options: OutputOptions, plan: ChunkPlan | None, deadline: float | None
                ) -> list[Item]:
    """The batch items of one prepared input: itself, or one per window (finished into its share of the join)."""
    if not p.windows:
        return [Item(p.value, model.cost(p.value), options.output, options, deadline)]
    alone = options if plan is not None and plan.details else None
    return [Item(value, model.cost(value), options.output, WindowPart(w, options.pooling, alone), deadline)
            for w, value in zip(p.windows, p.window_values, strict=True)]


def embedding(model: Model, p: Prepared, results: list[ItemResult], options: OutputOptions,
              plan: ChunkPlan | None) -> Embedding:
    """An input's Embedding from its item results: as they are, or its windows joined."""
    if not p.windows:
        embedding = Embedding(results[0].value, results[0].positions, p.truncated)
        if plan is not None and plan.details:
            end = p.audio_seconds if model.modality == "audio" else results[0].positions
            embedding.windows = [WindowResult(0.0, end, results[0].positions, 0, results[0].positions,
                                              results[0].value)]
        return embedding
    parts = [r.value[0] for r in results]
    value = options.finish_vectors(join(parts, p.windows, options.pooling))
    positions = p.windows[-1].offset + p.windows[-1].positions
    embedding = Embedding(value, positions, p.truncated)
    if plan is not None and plan.details:
        # span of the input: audio seconds; text token positions (its tokens sit after the whole input's <s>)
        scale, shift = (1 / model.sample_rate, 0) if model.modality == "audio" else (1, 1)
        embedding.windows = [WindowResult(w.start * scale + shift, w.end * scale + shift, r.positions, w.keep[0],
                                          w.keep[1], r.value[1]) for w, r in zip(p.windows, results, strict=True)]
    return embedding


def result(model: Model, request: EmbedRequest, prepared: list[Prepared], results: list[ItemResult],
           options: OutputOptions, plan: ChunkPlan | None, preprocess_s: float, total_s: float) -> EmbedResult:
    if plan is None:  # one item per input
        embeddings = [Embedding(r.value, r.positions, p.truncated) for p, r in zip(prepared, results, strict=True)]
    else:
        embeddings, first = [], 0
        for p in prepared:
            count = len(p.values)
            embeddings.append(embedding(model, p, results[first: first + count], options, plan))
            first += count
    positions = [e.positions for e in embeddings]
    usage = Usage(inputs=len(embeddings), positions=sum(positions))
    if model.modality == "text":
        usage.tokens = sum(positions)
    elif model.modality == "audio":
        usage.audio_frames = sum(positions)
        usage.audio_seconds = sum(p.audio_seconds for p in prepared)
    else:
        usage.images = len(embeddings)
    timings = Timings(preprocess_ms=1000 * preprocess_s, queue_ms=1000 * max(r.queue_s for r in results),
                      inference_ms=1000 * max(r.run_s for r in results), total_ms=1000 * total_s)
    return EmbedResult(model.name, embeddings, usage, timings, request.request_id, request.options.dtype)

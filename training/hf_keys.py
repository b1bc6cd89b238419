"""Published (transformers) parameter names -> ours, one table per modality. `{i}` is a layer index.

Keys in `OPTIONAL` may be absent from a published checkpoint (their presence depends on its config); then our
freshly initialised value stays. Task heads (CTC, classification, MLM, ...) are dropped and reported: in a model
saved from a ...For<Task> class, every key outside `MODEL_PREFIXES`; in a bare model, keys under `HEAD_PREFIXES`
(e.g. the text pooler's dense layer, which an encoder does not use). Anything else unmatched is an error.
"""

from __future__ import annotations

import re

AUDIO = {
    "feature_extractor.conv_layers.{i}.conv": "feature_extractor.{i}.conv",
    "feature_extractor.conv_layers.{i}.layer_norm": "feature_extractor.{i}.norm",
    "feature_projection.layer_norm": "feature_projection.norm",
    "feature_projection.projection": "feature_projection.proj",
    "masked_spec_embed": "mask_embedding",
    "encoder.pos_conv_embed.layers.{i}.conv": "pos_conv.{i}.conv",
    "encoder.layer_norm": "input_norm",
    "encoder.layers.{i}.attention.q_proj": "transformer.layers.{i}.attn.q",
    "encoder.layers.{i}.attention.k_proj": "transformer.layers.{i}.attn.k",
    "encoder.layers.{i}.attention.v_proj": "transformer.layers.{i}.attn.v",
    "encoder.layers.{i}.attention.out_proj": "transformer.layers.{i}.attn.out",
    "encoder.layers.{i}.layer_norm": "transformer.layers.{i}.attn_norm",
    "encoder.layers.{i}.feed_forward.intermediate_dense": "transformer.layers.{i}.ffn.fc1",
    "encoder.layers.{i}.feed_forward.output_dense": "transformer.layers.{i}.ffn.fc2",
    "encoder.layers.{i}.final_layer_norm": "transformer.layers.{i}.ffn_norm",
}

IMAGE = {
    "embeddings.cls_token": "cls_token",
    "embeddings.mask_token": "mask_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection": "patch_embed",
    "encoder.relative_position_bias.relative_position_bias_table": "transformer.rel_pos_bias.table",
    "encoder.layer.{i}.attention.attention.query": "transformer.layers.{i}.attn.q",
    "encoder.layer.{i}.attention.attention.key": "transformer.layers.{i}.attn.k",
    "encoder.layer.{i}.attention.attention.value": "transformer.layers.{i}.attn.v",
    "encoder.layer.{i}.attention.attention.relative_position_bias.relative_position_bias_table":
        "transformer.layers.{i}.attn.rel_pos_bias.table",
    "encoder.layer.{i}.attention.output.dense": "transformer.layers.{i}.attn.out",
    "encoder.layer.{i}.layernorm_before": "transformer.layers.{i}.attn_norm",
    "encoder.layer.{i}.layernorm_after": "transformer.layers.{i}.ffn_norm",
    "encoder.layer.{i}.intermediate.dense": "transformer.layers.{i}.ffn.fc1",
    "encoder.layer.{i}.output.dense": "transformer.layers.{i}.ffn.fc2",
    "encoder.layer.{i}.lambda_1": "transformer.layers.{i}.gamma_attn",
    "encoder.layer.{i}.lambda_2": "transformer.layers.{i}.gamma_ffn",
    "layernorm": "final_norm",
    "pooler.layernorm": "pool_norm",
}

TEXT = {
    "embeddings.word_embeddings": "token_embed",
    "embeddings.position_embeddings": "position_embed",
    "embeddings.token_type_embeddings": "token_type_embed",
    "embeddings.LayerNorm": "embed_norm",
    "encoder.layer.{i}.attention.self.query": "transformer.layers.{i}.attn.q",
    "encoder.layer.{i}.attention.self.key": "transformer.layers.{i}.attn.k",
    "encoder.layer.{i}.attention.self.value": "transformer.layers.{i}.attn.v",
    "encoder.layer.{i}.attention.output.dense": "transformer.layers.{i}.attn.out",
    "encoder.layer.{i}.attention.output.LayerNorm": "transformer.layers.{i}.attn_norm",
    "encoder.layer.{i}.intermediate.dense": "transformer.layers.{i}.ffn.fc1",
    "encoder.layer.{i}.output.dense": "transformer.layers.{i}.ffn.fc2",
    "encoder.layer.{i}.output.LayerNorm": "transformer.layers.{i}.ffn_norm",
}

TABLES = {"audio": AUDIO, "image": IMAGE, "text": TEXT}
MODEL_PREFIXES = {"audio": "data2vec_audio.", "image": "data2vec_vision.", "text": "data2vec_text."}
OPTIONAL = {"audio": {"mask_embedding"}, "image": {"mask_token"}, "text": set()}
HEAD_PREFIXES = ("lm_head.", "classifier.", "projector.", "qa_outputs.", "decode_head.", "auxiliary_head.",
                 "fpn", "adapter.", "tdnn.", "feature_extractor_head.", "objective.", "pooler.dense.")
# Buffers older transformers versions saved; we derive them.
DERIVED_SUFFIXES = ("relative_position_index", "embeddings.position_ids", "embeddings.token_type_ids")


def _compile(table: dict[str, str]) -> list[tuple[re.Pattern[str], str]]:
    rules = []
    for theirs, ours in table.items():
        pattern = re.escape(theirs).replace(r"\{i\}", r"(\d+)")
        rules.append((re.compile(f"^{pattern}(\\.(?:weight|bias))?$"), ours))
    return rules


RULES = {modality: _compile(table) for modality, table in TABLES.items()}


def map_key(modality: str, key: str) -> str | None:
    """Our name for a published key, or None when the table has no rule for it."""
    for pattern, ours in RULES[modality]:
        m = pattern.match(key)
        if m:
            groups = m.groups()
            index, suffix = (groups[0], groups[1]) if "{i}" in ours else (None, groups[0])
            name = ours.replace("{i}", index) if index is not None else ours
            return name + (suffix or "")
    return None

"""The objectives, one file each, behind one registry: `OBJECTIVES[name]` is the module, giving its `Objective`
(an nn.Module with `from_config`, `masker` and `configure_optimizer`), its `REFERENCE` defaults per modality and its
named `RECIPES`."""

from __future__ import annotations

from types import ModuleType

from ..config import ConfigError
from . import data2vec, data2vec2

OBJECTIVES: dict[str, ModuleType] = {"data2vec": data2vec, "data2vec2": data2vec2}


def get_objective(name: str) -> ModuleType:
    if name not in OBJECTIVES:
        raise ConfigError(f"unknown objective {name!r}; expected one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]

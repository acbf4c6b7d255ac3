"""SAE architectures: the protocol (`SAE`, `SAEConfig`), the registry, and one file per architecture."""

from __future__ import annotations

import importlib

from saelab.saes.base import (
    SAE,
    SAE_REGISTRY,
    SAEConfig,
    SparseActs,
    StepContext,
    StepOutput,
    get_sae_class,
    register_sae,
)

# Modules that register the built-in architectures on import.
BUILTIN_ARCHITECTURE_MODULES = (
    "saelab.saes.standard",
    "saelab.saes.jumprelu",
    "saelab.saes.topk",
    "saelab.saes.batchtopk",
    "saelab.saes.matryoshka",
    "saelab.saes.matching_pursuit",
    "saelab.saes.recipe",
)


def load_builtin_architectures() -> None:
    for module in BUILTIN_ARCHITECTURE_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:  # a real import error inside the module, not a missing file
                raise


__all__ = [
    "SAE",
    "SAE_REGISTRY",
    "SAEConfig",
    "SparseActs",
    "StepContext",
    "StepOutput",
    "get_sae_class",
    "register_sae",
    "load_builtin_architectures",
]

"""SAE architectures: the protocol (`SAE`, `SAEConfig`), the registry, and one file per architecture."""

from __future__ import annotations

from saelab.saes.base import SAE, AutotuneTarget, SAEConfig, StepContext, StepOutput
from saelab.saes.kernels import SparseActs
from saelab.saes.registry import (
    BUILTIN_ARCHITECTURE_MODULES,
    SAE_REGISTRY,
    get_sae_class,
    import_sae_class,
    load_builtin_architectures,
    register_sae,
    registered_sae_class,
)

__all__ = [
    "SAE",
    "SAE_REGISTRY",
    "AutotuneTarget",
    "BUILTIN_ARCHITECTURE_MODULES",
    "SAEConfig",
    "SparseActs",
    "StepContext",
    "StepOutput",
    "get_sae_class",
    "import_sae_class",
    "register_sae",
    "registered_sae_class",
    "load_builtin_architectures",
]

"""The architecture registry: names → SAE classes.

Two ways to get a class, on purpose:

* `registered_sae_class(name)`: registered names only. Names read from files (an SAE folder's
  cfg.json) go through this, so opening someone else's folder never imports code.
* `get_sae_class(name)`: registered names, or a user's class named explicitly as "module:Class" or
  "path/to/file.py:Class". This imports and runs that code, so `name` must come from the user (a
  command-line option such as `--arch`, or Python code), never from a file's contents.

Built-in architectures register themselves when their module is imported; `load_builtin_architectures`
imports them all (lazily, on the first lookup).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

from saelab.errors import ConfigError
from saelab.saes.base import SAE, SAEConfig

SAE_REGISTRY: dict[str, type[SAE]] = {}

_SAEClassT = TypeVar("_SAEClassT", bound="type[SAE]")

# Modules that register the built-in architectures on import.
BUILTIN_ARCHITECTURE_MODULES = (
    "saelab.saes.standard",
    "saelab.saes.jumprelu",
    "saelab.saes.topk",
    "saelab.saes.batchtopk",
    "saelab.saes.matryoshka",
    "saelab.saes.matching_pursuit",
    "saelab.saes.recipe",
    "saelab.saes.multi_l0",
    "saelab.saes.gated",
    "saelab.saes.abstopk",
)

# What a user types to make saelab import their architecture (repeated in every refusal).
USER_CODE_HINT = "pass --arch module:Class or --arch path/to/file.py:Class (or --trust-code) to import it"


def load_builtin_architectures() -> None:
    for module in BUILTIN_ARCHITECTURE_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:  # a real import error inside the module, not a missing file
                raise


def _same_definition(a: type, b: type) -> bool:
    # A module re-executed (importlib.reload) defines a new class object for the same code.
    return a.__module__ == b.__module__ and a.__qualname__ == b.__qualname__


def register_sae(name: str, *, override: bool = False):
    """Class decorator: `@register_sae("topk")` makes the class available by name everywhere.

    A name already taken by another class is refused (ConfigError) unless `override=True`: silently
    replacing e.g. "batchtopk" would change what every later run trains and loads."""

    def wrap(cls: _SAEClassT) -> _SAEClassT:
        if not (isinstance(cls, type) and issubclass(cls, SAE)):
            raise ConfigError("architecture", name, "registered class must subclass saelab.saes.SAE")
        if not isinstance(name, str) or not name:
            raise ConfigError("architecture", name, "must be a non-empty string")
        existing = SAE_REGISTRY.get(name)
        if existing is not None and existing is not cls and not override and not _same_definition(existing, cls):
            raise ConfigError(
                "architecture",
                name,
                f"is already registered to {existing.__module__}.{existing.__qualname__}; choose another name "
                f"for {cls.__module__}.{cls.__qualname__} or pass register_sae({name!r}, override=True)",
            )
        cls.architecture = name
        SAE_REGISTRY[name] = cls
        return cls

    return wrap


def known_names() -> str:
    return ", ".join(sorted(SAE_REGISTRY))


def registered_sae_class(name: str) -> type[SAE]:
    """The class registered as `name` (built-ins included); never imports user code.

    ConfigError("arch", name, ...) for anything else, telling the user how to import it explicitly."""
    load_builtin_architectures()
    if name in SAE_REGISTRY:
        return SAE_REGISTRY[name]
    raise ConfigError(
        "arch",
        name,
        f"is not a registered architecture (known: {known_names()}); if it is your own class, {USER_CODE_HINT}",
    )


def get_sae_class(name: str) -> type[SAE]:
    """A registered architecture, or the user's class named as "module:Class" / "path/file.py:Class".

    The second form imports (runs) that code: call this only with names the user typed."""
    load_builtin_architectures()
    if name in SAE_REGISTRY:
        return SAE_REGISTRY[name]
    if isinstance(name, str) and ":" in name:
        return import_sae_class(name)
    raise ConfigError("arch", name, f"unknown architecture; known: {known_names()}")


def arch_label(arch: str) -> str:
    """`arch` as it appears in SAE folder names: a "path/file.py:Class" keeps only "file.py:Class"
    (a path there would put the folder somewhere else, an absolute one outside the run)."""
    target, sep, attr = str(arch).rpartition(":")
    if sep and target.endswith(".py"):
        arch = f"{Path(target).name}:{attr}"
    return arch.replace("/", "_").replace("\\", "_")


def import_user_architectures(specs: Iterable[str]) -> None:
    """Resolve each name the user gave (e.g. `--arch` of a command that loads SAEs): imports and
    registers their classes, so saved folders naming them load."""
    for spec in specs:
        get_sae_class(spec)


def import_sae_class(spec: str) -> type[SAE]:
    """Import "module:Class" or "path/to/file.py:Class", check it is an SAE, register it as `spec`.

    Registering under `spec` makes later lookups (bench workers, saved folders naming the spec)
    find it without importing again; the class keeps the name its own `@register_sae` gave it."""
    if spec in SAE_REGISTRY:
        return SAE_REGISTRY[spec]
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise ConfigError("arch", spec, "must be module:Class or path/to/file.py:Class")
    try:
        module = _import_file(spec, target) if target.endswith(".py") else importlib.import_module(target)
        cls = getattr(module, attr)
    except ConfigError:
        raise
    except (ImportError, AttributeError) as err:
        raise ConfigError("arch", spec, f"cannot import user architecture: {err}") from None
    check_sae_protocol(spec, cls)
    if not vars(cls).get("architecture"):  # unregistered: an inherited name would load as the parent class
        cls.architecture = spec
    if "import_spec" not in vars(cls):  # what save_sae records, so --trust-code can import it again
        cls.import_spec = f"{Path(target).resolve()}:{attr}" if target.endswith(".py") else spec
    SAE_REGISTRY.setdefault(spec, cls)
    return cls


def _import_file(spec: str, filename: str) -> Any:
    path = Path(filename).expanduser().resolve()
    if not path.is_file():
        raise ConfigError("arch", spec, f"file {filename} does not exist")
    # One module per file, named after its absolute path, so importing the same file twice reuses it.
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    module_name = f"saelab_user_arch_{path.stem}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError("arch", spec, f"cannot import {filename} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # dataclasses look their module up while the file executes
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module


def check_sae_protocol(name: str, cls: Any) -> None:
    if not (isinstance(cls, type) and issubclass(cls, SAE)):
        raise ConfigError("arch", name, "is not a subclass of saelab.saes.SAE")
    missing = [m for m in ("encode", "train_forward") if getattr(cls, m) is getattr(SAE, m)]
    if missing:
        raise ConfigError("arch", name, f"does not implement the SAE protocol: missing {', '.join(missing)}()")


def register_variant(name: str, base: type[SAE], overrides: dict[str, Any]) -> type[SAE]:
    """Register `name` as `base` with config `overrides` applied on top of `base.config_for_l0`.

    A variant is a real registered architecture: it trains, saves and loads under its own name, so
    an ablation's results never mix with the full model's."""
    frozen = dict(overrides)

    def config_for_l0(cls: type[SAE], d_in: int, d_sae: int, l0: float, total_steps: int, **more: Any) -> SAEConfig:
        # `variant` is built by type() below, with `base` as its only base; pyright cannot follow a
        # two-argument super() of a class built at runtime, so it misses `base.config_for_l0`.
        return super(variant, cls).config_for_l0(  # pyright: ignore[reportAttributeAccessIssue]
            d_in, d_sae, l0, total_steps, **{**frozen, **more}
        )

    variant: type[SAE] = type(
        f"{base.__name__}__{name.replace('-', '_')}",
        (base,),
        {
            "config_for_l0": classmethod(config_for_l0),
            "variant_overrides": frozen,
            "ablations": {},
            "__doc__": f"{base.architecture} with {frozen}.",
            "__module__": base.__module__,
        },
    )
    return register_sae(name)(variant)


def register_ablations(base: type[SAE]) -> list[str]:
    """Register "<arch>-no_<component>" for each entry of `base.ablations`; returns the names."""
    names = []
    for component, overrides in base.ablations.items():
        name = f"{base.architecture}-no_{component}"
        register_variant(name, base, overrides)
        names.append(name)
    return names


def ablation_names(arch: str) -> list[str]:
    """The registered ablation variants of `arch` (ConfigError if it declares none)."""
    cls = get_sae_class(arch)
    if not cls.ablations:
        with_ablations = sorted(n for n, c in SAE_REGISTRY.items() if c.ablations)
        raise ConfigError(
            "ablate",
            arch,
            f"declares no ablations; architectures with ablations: {', '.join(with_ablations) or 'none'}",
        )
    return [f"{cls.architecture}-no_{component}" for component in cls.ablations]

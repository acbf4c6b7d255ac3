"""Architecture variants: a base architecture with config overrides, registered under a name of their own.

On the command line a variant is `ARCH:key=value[,key=value...]`, e.g. `recipe:ista_steps=0` or
`matryoshka:inner_loss_multipliers=[0.5,0.5,0.5]`. Values are JSON where they parse as JSON, else strings;
commas inside brackets stay with their value. ARCH may itself be a user class (`ideas/x.py:MySAE:knob=2`).
The variant is registered as `ARCH[key=value,...]` (keys sorted, values in compact JSON), so the same overrides
always give the same name, and its results never mix with the base's in the store.

Spawned worker processes do not inherit the registry, so a `VariantSpec` travels with the bench request and each
worker registers it again (`register_variants`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from saelab.errors import ConfigError

# The ':' that starts the overrides: the first one followed by `identifier=` (a module path or a file's
# `path.py:Class` never has '=' right after a name).
_OVERRIDES_START = re.compile(r":(?=\s*[A-Za-z_][A-Za-z0-9_]*\s*=)")


@dataclass
class VariantSpec:
    """`base` with config `overrides`, registered as `name`; `text` is what the user typed (for messages)."""

    name: str
    base: str
    overrides: dict[str, Any] = field(default_factory=dict)
    text: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "base": self.base, "overrides": dict(self.overrides), "text": self.text}


def split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets and quotes, so list values like [0.5,0.5] stay whole."""
    parts, depth, current, quoted = [], 0, [], False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        elif not quoted:
            depth += ch in "[{"
            depth -= ch in "]}"
        if ch == "," and depth == 0 and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def parse_value(raw: str) -> Any:
    """JSON when it parses as JSON (numbers, true/false/null, lists, quoted strings), else the text itself."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def parse_overrides(
    body: str, *, field_name: str = "variant", spec: str | None = None, assign: str = "="
) -> dict[str, Any]:
    """'key=value,key=value' → {key: value}; ConfigError(field_name, spec, ...) naming a malformed item."""
    overrides: dict[str, Any] = {}
    for item in split_top_level(body):
        if not item.strip():
            continue
        key, sep, raw = item.partition(assign)
        key = key.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ConfigError(field_name, spec if spec is not None else body, f"{item!r} is not key{assign}value")
        if key in overrides:
            raise ConfigError(field_name, spec if spec is not None else body, f"sets {key} twice")
        overrides[key] = parse_value(raw.strip())
    if not overrides:
        raise ConfigError(field_name, spec if spec is not None else body, f"names no key{assign}value override")
    return overrides


def format_value(value: Any) -> str:
    """A value as it appears in a variant name: compact JSON, except plain strings that cannot be misread."""
    if isinstance(value, str) and not re.search(r"[\s,\[\]{}=\"]", value) and parse_value(value) == value:
        return value
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def variant_name(base: str, overrides: dict[str, Any]) -> str:
    """`recipe[ista_steps=0]`: deterministic (keys sorted), whatever order the overrides were typed in."""
    return f"{base}[{','.join(f'{k}={format_value(overrides[k])}' for k in sorted(overrides))}]"


def parse_variant_spec(text: str) -> VariantSpec | None:
    """`ARCH:key=value,...` as a VariantSpec; None when `text` is no override spec (a plain or import name)."""
    m = _OVERRIDES_START.search(text)
    if m is None:
        return None
    base, body = text[: m.start()].strip(), text[m.end() :]
    if not base:
        raise ConfigError("variant", text, "names no base architecture before the overrides (ARCH:key=value)")
    overrides = parse_overrides(body, spec=text)
    return VariantSpec(name=variant_name(base, overrides), base=base, overrides=overrides, text=text)


def register_variant_spec(
    spec: VariantSpec, *, d_in: int = 256, d_sae: int = 1024, l0: float = 12.0, total_steps: int = 1000
) -> type:
    """Register `spec` (idempotent) and dry-run its config, so a misspelt or invalid override fails before any
    training. The dry run uses the given shapes (pass the protocol's)."""
    from saelab.saes.registry import SAE_REGISTRY, get_sae_class, register_variant

    label = spec.text or spec.name
    base_cls = get_sae_class(spec.base)
    existing = SAE_REGISTRY.get(spec.name)
    if existing is not None:
        if getattr(existing, "variant_overrides", None) == spec.overrides and issubclass(existing, base_cls):
            return existing
        raise ConfigError("variant", label, f"the name {spec.name!r} is already registered to another architecture")
    cls = register_variant(spec.name, base_cls, spec.overrides)
    try:
        cls.config_for_l0(d_in=d_in, d_sae=d_sae, l0=float(l0), total_steps=int(total_steps))
    except (TypeError, ValueError) as err:  # ConfigError is a ValueError
        SAE_REGISTRY.pop(spec.name, None)
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError("variant", label, f"invalid override for {spec.base}: {reason}") from None
    return cls


def register_variants(specs: list[VariantSpec], **dims: Any) -> list[str]:
    """Register each spec (in a worker process, the ones its parent registered); returns their names."""
    return [register_variant_spec(s, **dims).architecture for s in specs]


def resolve_arch(text: str, **dims: Any) -> tuple[str, VariantSpec | None]:
    """What the user named, ready to train: (registered name, the VariantSpec when it was an override spec).

    A registered name or `module:Class` / `file.py:Class` is looked up (the last two import the user's code,
    which they named on the command line); `ARCH:key=value` is registered as a variant."""
    from saelab.saes.registry import get_sae_class

    text = str(text).strip()
    if not text:
        raise ConfigError("variant", text, "is empty; name an architecture")
    spec = parse_variant_spec(text)
    if spec is None:
        get_sae_class(text)
        return text, None
    register_variant_spec(spec, **dims)
    return spec.name, spec


def resolve_archs(texts: list[str], **dims: Any) -> tuple[list[str], list[VariantSpec]]:
    """Every architecture a bench names, resolved as `resolve_arch` does: (registered names in the given order,
    the VariantSpecs among them, for spawned workers to register again). A name given twice, or two spellings of
    one variant (`batchtopk:skip=false`, `batchtopk: skip = false`), trains once."""
    names: list[str] = []
    specs: list[VariantSpec] = []
    for text in texts:
        name, spec = resolve_arch(text, **dims)
        if name in names:
            continue
        names.append(name)
        if spec is not None:
            specs.append(spec)
    return names, specs

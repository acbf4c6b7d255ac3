"""Which format a path holds, and `load_pretrained`: one entry point for every supported SAE format."""

from __future__ import annotations

import json
from pathlib import Path

from saelab.errors import ConfigError, FileFormatError
from saelab.saes.base import SAE
from saelab.saes.formats import dictionary_learning, gemma_scope, llama_scope, sparsify
from saelab.saes.formats.common import PretrainedInfo, clip

SAELENS = "saelens"
SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
FORMATS = (SAELENS, gemma_scope.FORMAT, dictionary_learning.FORMAT, sparsify.FORMAT, llama_scope.FORMAT)
# What each format's folder holds (for the error when a path holds none of them).
LAYOUTS = (
    f"{SAELENS_CFG} + {SAELENS_WEIGHTS} (SAELens/saelab)",
    f"{gemma_scope.NPZ_FILENAME} or {gemma_scope.SAFETENSORS_FILENAME} (Gemma Scope)",
    f"{dictionary_learning.WEIGHTS_FILENAME} + {dictionary_learning.CONFIG_FILENAME} (dictionary_learning)",
    f"{sparsify.CONFIG_FILENAME} + {sparsify.WEIGHTS_FILENAME} (sparsify)",
    f"{llama_scope.CONFIG_FILENAME} + {llama_scope.WEIGHTS_CANDIDATES[0]} (Llama Scope)",
)
# A file named on the command line stands for its folder in this format.
_FILE_FORMATS = {
    SAELENS_WEIGHTS: SAELENS,
    gemma_scope.NPZ_FILENAME: gemma_scope.FORMAT,
    gemma_scope.SAFETENSORS_FILENAME: gemma_scope.FORMAT,
    sparsify.WEIGHTS_FILENAME: sparsify.FORMAT,
    llama_scope.CONFIG_FILENAME: llama_scope.FORMAT,
}


def _folder_format(folder: Path) -> str | None:
    # A weights file decides: SAELens and sparsify folders both have a cfg.json.
    if (folder / SAELENS_WEIGHTS).is_file():
        return SAELENS
    if sparsify.matches(folder):
        return sparsify.FORMAT
    if gemma_scope.matches(folder):
        return gemma_scope.FORMAT
    if dictionary_learning.matches(folder):
        return dictionary_learning.FORMAT
    if llama_scope.matches(folder):
        return llama_scope.FORMAT
    if (folder / SAELENS_CFG).is_file():  # a folder missing its weights: its loader names the missing file
        return sparsify.FORMAT if _looks_like_sparsify_cfg(folder / SAELENS_CFG) else SAELENS
    return None


def _looks_like_sparsify_cfg(path: Path) -> bool:
    """sparsify's cfg.json has k and a width but no "architecture" (SAELens's always has one)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and "architecture" not in data and "k" in data and "d_in" in data


def resolve(path: str | Path) -> tuple[str, Path, Path | None]:
    """(format, folder, weights file named by the user or None) for an SAE folder or one of its files.

    FileFormatError naming the path when it holds no supported SAE."""
    path = Path(path)
    if not path.exists():
        raise FileFormatError(f"SAE folder {path} does not exist")
    if path.is_file():
        name = path.name
        if name in _FILE_FORMATS:
            return _FILE_FORMATS[name], path.parent, None
        if name == "final.safetensors" and path.parent.name == "checkpoints":
            return llama_scope.FORMAT, path.parent.parent, None
        if path.suffix in (".pt", ".pth") and dictionary_learning.config_for(path).is_file():
            return dictionary_learning.FORMAT, path.parent, path
        if name == SAELENS_CFG:
            fmt = _folder_format(path.parent)
            if fmt is not None:
                return fmt, path.parent, None
        raise FileFormatError(f"{path} is not a file of a supported SAE format; name its folder, holding {_layouts()}")
    fmt = _folder_format(path)
    if fmt is None:
        raise FileFormatError(f"{path} holds no SAE: expected {_layouts()}{_subfolder_hint(path)}")
    return fmt, path, None


def detect_format(path: str | Path) -> str:
    """The format of the SAE at `path` (one of FORMATS); FileFormatError if it holds none."""
    return resolve(path)[0]


def is_sae_path(path: str | Path) -> bool:
    """Whether `path` is an SAE folder (or file) in any supported format; never raises."""
    try:
        resolve(path)
    except (FileFormatError, OSError):
        return False
    return True


def load_pretrained(
    path: str | Path, device: str = "cpu", *, arch: str | type[SAE] | None = None, trust_code: bool = False
) -> SAE:
    """The SAE at `path`, whatever its format (see the package docstring)."""
    return load_pretrained_with_info(path, device, arch=arch, trust_code=trust_code)[0]


def load_pretrained_with_info(
    path: str | Path, device: str = "cpu", *, arch: str | type[SAE] | None = None, trust_code: bool = False
) -> tuple[SAE, PretrainedInfo]:
    """`load_pretrained` plus where the SAE came from (format, the source's own type, conversions applied)."""
    fmt, folder, weights = resolve(path)
    if fmt == SAELENS:
        from saelab.saes.saelens_format import load_sae

        sae = load_sae(folder, device=device, arch=arch, trust_code=trust_code)
        return sae, PretrainedInfo(SAELENS, sae.architecture, folder)
    if arch is not None:
        name = arch if isinstance(arch, str) else getattr(arch, "__qualname__", str(arch))
        raise ConfigError("arch", clip(name), f"applies to SAELens-format folders only; {path} is a {fmt} SAE")
    if fmt == dictionary_learning.FORMAT:
        return dictionary_learning.load(folder, device, weights)
    loader = {
        gemma_scope.FORMAT: gemma_scope.load,
        sparsify.FORMAT: sparsify.load,
        llama_scope.FORMAT: llama_scope.load,
    }
    return loader[fmt](folder, device)


def _layouts() -> str:
    return "; or ".join(LAYOUTS)


def _subfolder_hint(folder: Path) -> str:
    """A checkpoint with one SAE per hookpoint/layer: point at its SAE subfolders."""
    try:
        subs = sorted(p.name for p in folder.iterdir() if p.is_dir() and _folder_format(p) is not None)
    except OSError:
        return ""
    if not subs:
        return ""
    shown = ", ".join(subs[:4]) + (f", ... ({len(subs)} in all)" if len(subs) > 4 else "")
    return f"; it holds SAE folders ({shown}): name one of them"

"""Pretrained SAEs as a run's starting point (`saelab train --init-from DIR`), and the one loader.

`load_pretrained_sae` is the single place that names the loader of pretrained folders (any format of
`saelab.saes.formats`), used here and by `saelab l0 --saes`. A loaded SAE is in its inference form
(input scale and, for the TopK family, decoder norms folded in; BatchTopK-family SAEs saved as
JumpReLU), so `init_training_sae` puts its weights into the training form of the run's architecture:

* same class (TopK, JumpReLU, Standard, ...): every tensor is copied;
* a JumpReLU whose folder says it was trained as a BatchTopK-family SAE (saelab's cfg.json
  `metadata.training_architecture`; dictionary_learning's `BatchTopKSAE` / `MatryoshkaBatchTopKSAE`),
  fine-tuned as that architecture: W_enc, b_enc, W_dec and b_dec are copied and the JumpReLU
  threshold becomes the batch threshold θ (their mean if they differ per latent), taken as fully
  estimated. Training then selects the k·B largest scores of each batch as usual (which the
  calibrated θ approximates); θ is what the saved inference SAE uses, recalibrated when the run
  saves it. A Matryoshka's level widths are not in the inference form: they are the run's
  (`--option matryoshka_widths=[...]`).

The weights are in input units, so the training SAE gets `normalize_activations="none"` (the
trainer's input-norm estimate would rescale inputs the weights were not trained on), the folder's
`apply_b_dec_to_input` (Gemma Scope's encoder does not subtract b_dec), and a TopK-family SAE whose
decoder rows are not unit-norm keeps `rescale_acts_by_decoder_norm=False` (with unit rows both
choices select and decode alike). So the first step computes the pretrained SAE's own function. The
other training settings (sparsity coefficients and their warm-up, the L0 autotuner, JumpReLU's STE
bandwidth) are the architecture's, as for a fresh run; set them with --option.

The folder's architecture, width and recorded L0 (`l0_target`, a dictionary_learning trainer's k,
a TopK SAE's k) are what `saelab train` uses for --arch, --width and --l0 left out (cli/train.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from saelab.errors import ConfigError
from saelab.saes.base import SAE

# Decoder rows within this of unit norm count as unit (saved fp32 folders sit at ~1e-7).
UNIT_NORM_TOLERANCE = 1e-4


def load_pretrained_sae(path: str | Path, device: str = "cpu") -> SAE:
    """An SAE folder in any format saelab reads; each problem with it is a one-line FileFormatError."""
    from saelab.saes.formats import load_pretrained

    return load_pretrained(path, device=device)


@dataclass(frozen=True)
class PretrainedFolder:
    """What a pretrained folder says about itself, beyond its weights."""

    path: str
    architecture: str  # the loaded (inference) SAE's architecture
    training_architecture: str | None  # the architecture it was trained as, when the folder records it
    d_in: int
    d_sae: int
    l0: float | None  # its target L0 when recorded (saelab's metadata) or fixed (a TopK SAE's k)

    @property
    def architectures(self) -> list[str]:
        """The names --arch may give when fine-tuning it (training architecture first)."""
        return list(dict.fromkeys(a for a in (self.training_architecture, self.architecture) if a))


# dictionary_learning classes whose inference form is a JumpReLU → the saelab architecture they train as.
DICTIONARY_LEARNING_TRAINED_AS = {"BatchTopKSAE": "batchtopk", "MatryoshkaBatchTopKSAE": "matryoshka"}


def _json_object(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def folder_metadata(path: str | Path) -> dict[str, Any]:
    """What a folder records beyond its weights, as saelab's `save_sae` spells it (`training_architecture`,
    `l0_target`): a SAELens-format cfg.json's `metadata`, or a dictionary_learning config.json's
    trainer class and k; {} otherwise. Only read once the loader accepted the folder."""
    folder = Path(path)
    if not folder.is_dir():
        folder = folder.parent  # a file of the folder (e.g. ae.pt)
    metadata = _json_object(folder / "cfg.json").get("metadata")
    if isinstance(metadata, dict):
        return metadata
    trainer = _json_object(folder / "config.json").get("trainer")
    if isinstance(trainer, dict):
        out: dict[str, Any] = {}
        trained_as = DICTIONARY_LEARNING_TRAINED_AS.get(str(trainer.get("dict_class")))
        if trained_as is not None:
            out["training_architecture"] = trained_as
        if trainer.get("k") is not None:
            out["l0_target"] = trainer["k"]
        return out
    return {}


def pretrained_info(path: str | Path, sae: SAE) -> PretrainedFolder:
    from saelab.saes.registry import SAE_REGISTRY

    metadata = folder_metadata(path)
    trained_as = metadata.get("training_architecture")
    if not (isinstance(trained_as, str) and trained_as in SAE_REGISTRY):
        trained_as = None
    return PretrainedFolder(
        path=str(path),
        architecture=sae.architecture,
        training_architecture=trained_as,
        d_in=sae.cfg.d_in,
        d_sae=sae.cfg.d_sae,
        l0=recorded_l0(metadata, sae),
    )


def recorded_l0(metadata: dict[str, Any], sae: SAE) -> float | None:
    """The L0 a folder was made for: saelab's recorded target, else a TopK SAE's fixed k; None if neither."""
    from saelab.saes.topk_family import TopKFamilySAE

    target = metadata.get("l0_target")
    if isinstance(target, (int, float)) and not isinstance(target, bool) and math.isfinite(target) and target > 0:
        return float(target)
    if isinstance(sae, TopKFamilySAE):  # k is the target L0 (per sample, or the batch mean)
        return float(sae.cfg.k)
    return None


def check_init_arch(arch: str, info: PretrainedFolder) -> None:
    """--arch, when given with --init-from, must name the folder's architecture."""
    if arch not in info.architectures:
        raise ConfigError(
            "arch",
            arch,
            f"differs from the architecture of the SAE in {info.path} "
            f"({' or '.join(info.architectures)}); fine-tuning keeps it: leave out --arch or name it",
        )


def check_init_d_in(info: PretrainedFolder, d_in: int, data: str) -> None:
    """The pretrained SAE's input size must match the data's."""
    if info.d_in != d_in:
        raise ConfigError(
            "init_from",
            info.path,
            f"has d_in={info.d_in} but the data{' ' + data if data else ''} has d_in={d_in}; they must match",
        )


def check_init_width(info: PretrainedFolder, width: int) -> None:
    """Fine-tuning keeps the width: --width must be the pretrained SAE's d_sae."""
    if info.d_sae != width:
        raise ConfigError(
            "width",
            width,
            f"differs from d_sae={info.d_sae} of the SAE in {info.path}; fine-tuning keeps the width: "
            f"pass --width {info.d_sae} or leave --width out",
        )


def unit_decoder_rows(sae: SAE) -> bool:
    norms_L = sae.W_dec_LD.detach().float().norm(dim=1)
    return bool(((norms_L - 1).abs() <= UNIT_NORM_TOLERANCE).all())


def init_config_overrides(cls: type[SAE], pretrained: SAE) -> dict[str, Any]:
    """Config values the training SAE must take to compute the pretrained SAE's function (see module doc)."""
    fields = {f.name for f in dataclasses.fields(cls.config_class)}
    # Gemma Scope-style JumpReLUs do not subtract b_dec from the input: keep whichever the SAE does.
    overrides: dict[str, Any] = {
        "normalize_activations": "none",
        "apply_b_dec_to_input": pretrained.cfg.apply_b_dec_to_input,
    }
    if "rescale_acts_by_decoder_norm" in fields and not unit_decoder_rows(pretrained):
        overrides["rescale_acts_by_decoder_norm"] = False
    return overrides


def prepare_init(
    path: str, archs: list[str], d_in: int, width: int, pretrained: SAE | None = None, data: str = ""
) -> SAE:
    """The pretrained SAE a run starts from (loaded unless given), checked against the run's architectures,
    data width and --width."""
    sae = pretrained if pretrained is not None else load_pretrained_sae(path)
    info = pretrained_info(path, sae)
    for arch in archs:
        check_init_arch(arch, info)
    check_init_d_in(info, d_in, data)
    check_init_width(info, width)
    return sae


def describe_init(pretrained: SAE, cls: type[SAE], where: str) -> str:
    """One line saying how `pretrained` becomes the training SAE of class `cls` (see the module doc);
    ConfigError if it cannot."""
    from saelab.saes.topk_family import BatchThresholdMixin

    if cls is type(pretrained):
        return f"initialised from {where}: every {pretrained.architecture} tensor copied"
    if issubclass(cls, BatchThresholdMixin) and isinstance(getattr(pretrained, "threshold_L", None), torch.Tensor):
        return (
            f"initialised from {where}: a JumpReLU inference SAE trained as {cls.architecture}; W_enc, b_enc, "
            f"W_dec and b_dec copied into a {cls.architecture} SAE, its JumpReLU threshold (the mean, if it "
            "differs per latent) as the batch threshold"
        )
    raise ConfigError(
        "init_from",
        where,
        f"holds a {pretrained.architecture} SAE, which cannot initialise a {cls.architecture} SAE; "
        f"fine-tune it as {pretrained.architecture}",
    )


@torch.no_grad()
def init_training_sae(sae: SAE, pretrained: SAE, where: str) -> str:
    """Copy `pretrained`'s weights into the training SAE `sae`; returns `describe_init`'s line."""
    note = describe_init(pretrained, type(sae), where)
    if type(sae) is type(pretrained):
        mine = sae.state_dict()
        theirs = pretrained.state_dict()
        for key, value in mine.items():
            got = theirs.get(key)
            if got is None or got.shape != value.shape:
                raise ConfigError(
                    "init_from",
                    where,
                    f"tensor {key} has shape {tuple(getattr(got, 'shape', ()))}, the {sae.architecture} SAE "
                    f"being trained needs {tuple(value.shape)}",
                )
            value.copy_(got)
        return note
    for name in ("W_enc_DL", "b_enc_L", "W_dec_LD", "b_dec_D"):
        getattr(sae, name).copy_(getattr(pretrained, name))
    threshold_L = pretrained.get_parameter("threshold_L")
    sae.get_buffer("topk_threshold").fill_(float(threshold_L.detach().double().mean()))
    sae.get_buffer("topk_threshold_weight").fill_(1.0)  # taken as fully estimated, not an EMA started at 0
    return note

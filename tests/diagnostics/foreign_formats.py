"""Writers of foreign SAE formats for tests: a saelab SAE re-saved the way another library releases it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from saelab.saes.saelens_format import load_sae


def save_gemma_scope(saelab_folder: Path, out: Path) -> Path:
    """A saelab JumpReLU inference SAE as Gemma Scope's params.npz (W_enc, W_dec, b_enc, b_dec, threshold)."""
    sae = load_sae(saelab_folder)
    assert sae.architecture == "jumprelu" and sae.cfg.apply_b_dec_to_input
    with torch.no_grad():
        W_enc_DL, W_dec_LD, b_dec_D = sae.W_enc_DL.double(), sae.W_dec_LD.double(), sae.b_dec_D.double()
        # Gemma Scope computes x W_enc + b_enc: the b_dec saelab subtracts from x moves into b_enc.
        b_enc_L = sae.b_enc_L.double() - b_dec_D @ W_enc_DL
    out.mkdir(parents=True)
    arrays = {"W_enc": W_enc_DL, "W_dec": W_dec_LD, "b_enc": b_enc_L, "b_dec": b_dec_D, "threshold": sae.threshold_L}
    np.savez(out / "params.npz", **{k: v.detach().float().numpy() for k, v in arrays.items()})
    return out

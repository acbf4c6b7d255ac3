"""s_n^dec and decoder |cos| against direct reference computations."""

from __future__ import annotations

import pytest
import torch

from saelab.diagnostics.projection import (
    decoder_pairwise_abs_cos,
    decoder_projections,
    nth_decoder_projection,
    nth_decoder_projection_scores,
)
from saelab.errors import ConfigError
from tests.diagnostics.diag_standins import HandSAE


def reference_nth(x, W_dec, b_dec, n):
    """The reference (sparse-but-wrong `nth_decoder_projection`), written out literally."""
    W = W_dec / W_dec.norm(dim=-1, keepdim=True)
    proj = (x - b_dec) @ W.T
    return proj.flatten().sort(descending=True).values[n * x.shape[0]].item()


@pytest.fixture
def sae():
    g = torch.Generator().manual_seed(0)
    W_dec = torch.randn(12, 6, generator=g) * torch.linspace(0.2, 3, 12).unsqueeze(1)  # uneven row norms
    return HandSAE(W_dec.T, W_dec, b_dec_D=torch.randn(6, generator=g))


def test_matches_reference(sae):
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(1))
    for n in (1, 3, 5, 11):
        assert nth_decoder_projection(sae, x, n) == pytest.approx(
            reference_nth(x, sae.W_dec_LD, sae.b_dec_D, n), abs=1e-6
        )
    many = nth_decoder_projection_scores(sae, x, [2, 7])
    assert many == {
        2: pytest.approx(reference_nth(x, sae.W_dec_LD, sae.b_dec_D, 2), abs=1e-6),
        7: pytest.approx(reference_nth(x, sae.W_dec_LD, sae.b_dec_D, 7), abs=1e-6),
    }


def test_invariant_to_decoder_row_scale(sae):
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(2))
    scaled = HandSAE(sae.W_enc_DL, sae.W_dec_LD * torch.arange(1, 13).unsqueeze(1), b_dec_D=sae.b_dec_D)
    assert nth_decoder_projection(scaled, x, 4) == pytest.approx(nth_decoder_projection(sae, x, 4), abs=1e-5)


def test_true_features_give_zero_beyond_true_l0():
    # identity decoder on inputs with exactly 2 active unit features: projections are the activations
    sae = HandSAE(torch.eye(8), torch.eye(8))
    x = torch.zeros(30, 8)
    for i in range(30):
        x[i, [i % 8, (i + 3) % 8]] = 1.0
    assert nth_decoder_projection(sae, x, 1) == 1.0
    assert nth_decoder_projection(sae, x, 2) == 0.0
    assert nth_decoder_projection(sae, x, 5) == 0.0
    assert decoder_projections(sae, x).shape == (30, 8)


def test_pairwise_cos():
    assert decoder_pairwise_abs_cos(torch.eye(5)) == pytest.approx(0.0)
    W = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, -2.0]])
    c = 2**-0.5
    assert decoder_pairwise_abs_cos(W) == pytest.approx((c + 0 + c) / 3)
    g = torch.randn(300, 20, generator=torch.Generator().manual_seed(0))
    assert decoder_pairwise_abs_cos(g, chunk_size=7) == pytest.approx(
        decoder_pairwise_abs_cos(g, chunk_size=1000), rel=1e-6
    )


def test_saelens_style_attribute_names():
    class SAELensLike:
        W_dec = torch.eye(4)
        b_dec = torch.zeros(4)

    x = torch.eye(4)
    assert nth_decoder_projection(SAELensLike(), x, 1) == 0.0


@pytest.mark.parametrize(
    "n, match",
    [
        (12, "smaller than the SAE width"),
        (20, "smaller than the SAE width"),
        (0, "positive integer"),
        (2.5, "positive integer"),
        (True, "positive integer"),
    ],
)
def test_bad_n(sae, n, match):
    with pytest.raises(ConfigError, match=match):
        nth_decoder_projection(sae, torch.randn(4, 6), n)


def test_width_mismatch(sae):
    with pytest.raises(ConfigError, match="SAE and data must match"):
        nth_decoder_projection(sae, torch.randn(4, 7), 2)
    with pytest.raises(ConfigError, match="activations"):
        nth_decoder_projection(sae, torch.randn(6), 2)

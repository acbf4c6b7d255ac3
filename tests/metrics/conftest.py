"""Tiny stand-ins for an SAE and a synthetic model, shared by the metrics tests."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from saelab.saes.base import SAE, SAEConfig


class ToyModel:
    """Stand-in synthetic model: orthonormal features (random unit ones if F > D), independent Bernoulli firing, magnitudes U[1, 2].

    x = a @ feature_vectors_FD + bias_D. Samples come from its own generator (reproducible).
    """

    def __init__(self, num_features=6, hidden_dim=8, p=0.3, bias=0.0, seed=0):
        gen = torch.Generator().manual_seed(seed)
        if num_features <= hidden_dim:
            q_DD, _ = torch.linalg.qr(torch.randn(hidden_dim, hidden_dim, generator=gen, dtype=torch.float64))
            self.feature_vectors_FD = q_DD[:num_features].float()
        else:  # superposition: random unit vectors
            g_FD = torch.randn(num_features, hidden_dim, generator=gen)
            self.feature_vectors_FD = g_FD / g_FD.norm(dim=1, keepdim=True)
        self.bias_D = bias * torch.ones(hidden_dim) / hidden_dim**0.5
        self.num_features, self.hidden_dim = num_features, hidden_dim
        self.p_F = torch.full((num_features,), p) if isinstance(p, float) else torch.as_tensor(p)
        self.generator = torch.Generator().manual_seed(seed + 1)

    def sample_with_features(self, batch_size):
        fires_BF = torch.rand(batch_size, self.num_features, generator=self.generator) < self.p_F
        mags_BF = 1 + torch.rand(batch_size, self.num_features, generator=self.generator)
        a_BF = torch.where(fires_BF, mags_BF, torch.zeros(()))
        return a_BF @ self.feature_vectors_FD + self.bias_D, a_BF


class PoolModel(ToyModel):
    """Serves a fixed pool of samples in order, so any batch split sees the same samples."""

    def __init__(self, n_pool, **kw):
        super().__init__(**kw)
        self.hidden_ND, self.acts_NF = ToyModel.sample_with_features(self, n_pool)
        self.pos = 0

    def sample_with_features(self, batch_size):
        s = slice(self.pos, self.pos + batch_size)
        self.pos += batch_size
        return self.hidden_ND[s], self.acts_NF[s]


class OracleSAE(SAE):
    """Decoder rows = (signed, permuted) true features; encode = projection with exact zeros.

    With orthonormal features, z = (x − b_dec) W_decᵀ recovers ± the true activations up to
    rounding; |z| ≤ 1e-3 is set to exactly 0 so the firing pattern is exact.
    """

    def encode(self, x_BD):
        z_BL = (x_BD.to(self.W_dec_LD.dtype) - self.b_dec_D) @ self.W_dec_LD.T
        return torch.where(z_BL.abs() > 1e-3, z_BL, torch.zeros(()))


class ReluSAE(SAE):
    """An ordinary (untrained) ReLU SAE."""

    def encode(self, x_BD):
        return torch.relu(self.pre_acts(x_BD))


def make_oracle(model, perm=None, signs=None):
    F, D = model.num_features, model.hidden_dim
    sae = OracleSAE(SAEConfig(d_in=D, d_sae=F))
    W_LD = model.feature_vectors_FD.clone()
    if perm is not None:
        W_LD = W_LD[perm]
    if signs is not None:
        W_LD = W_LD * signs[:, None]
    with torch.no_grad():
        sae.W_dec_LD.copy_(W_LD)
        sae.b_dec_D.copy_(model.bias_D)
    return sae


def plain_sae(W_dec_LD, encode, decode):
    """A non-nn.Module SAE: just the attributes the metrics use."""
    L, D = W_dec_LD.shape
    return SimpleNamespace(W_dec_LD=W_dec_LD, cfg=SimpleNamespace(d_in=D, d_sae=L), encode=encode, decode=decode)


@pytest.fixture
def fakes():
    return SimpleNamespace(
        ToyModel=ToyModel,
        PoolModel=PoolModel,
        OracleSAE=OracleSAE,
        ReluSAE=ReluSAE,
        make_oracle=make_oracle,
        plain_sae=plain_sae,
    )

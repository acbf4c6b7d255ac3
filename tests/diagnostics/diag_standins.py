"""Small stand-ins shared by the diagnostics tests: a hand-set ReLU SAE and a hierarchical toy model."""

from __future__ import annotations

from types import SimpleNamespace

import torch


class HandSAE:
    """A ReLU SAE with weights given by hand: z = ReLU((x − b_dec) W_enc + b_enc), x̂ = z W_dec + b_dec."""

    def __init__(self, W_enc_DL, W_dec_LD, b_enc_L=None, b_dec_D=None):
        self.W_enc_DL = torch.as_tensor(W_enc_DL, dtype=torch.float32)
        self.W_dec_LD = torch.as_tensor(W_dec_LD, dtype=torch.float32)
        L, D = self.W_dec_LD.shape
        # a tiny negative bias keeps float round-off (x·f_j ≈ 1e-8 for orthogonal f_j) from "firing"
        self.b_enc_L = torch.full((L,), -1e-4) if b_enc_L is None else torch.as_tensor(b_enc_L, dtype=torch.float32)
        self.b_dec_D = torch.zeros(D) if b_dec_D is None else torch.as_tensor(b_dec_D, dtype=torch.float32)

    def encode(self, x_BD):
        return torch.relu((x_BD - self.b_dec_D) @ self.W_enc_DL + self.b_enc_L)

    def decode(self, z_BL):
        return z_BL @ self.W_dec_LD + self.b_dec_D


class TreeModel:
    """Orthonormal features in R^D; feature 0 is the parent of 1 and 2 (mutually exclusive), 3 is a
    free feature. Parent fires with p=0.5; given the parent, child 1 w.p. 0.4, child 2 w.p. 0.3;
    feature 3 w.p. 0.2. Magnitudes 1. Mirrors the parts of SyntheticModel the diagnostics use."""

    def __init__(self, hidden_dim: int = 8, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(hidden_dim, hidden_dim, generator=g, dtype=torch.float64))
        self.num_features, self.hidden_dim = 4, hidden_dim
        self.feature_vectors_FD = q[:4].float().contiguous()
        self.bias_D = torch.zeros(hidden_dim)
        self.firing_probabilities_F = torch.tensor([0.5, 0.2, 0.15, 0.2])
        self.hierarchy = SimpleNamespace(compiled=SimpleNamespace(parent_F=torch.tensor([-1, 0, 0, -1])))
        self.generator = torch.Generator().manual_seed(seed + 1)

    def manual_seed(self, seed):
        self.generator.manual_seed(seed)
        return self

    def sample_with_features(self, batch_size):
        u = torch.rand(batch_size, 3, generator=self.generator)
        parent = u[:, 0] < 0.5
        child1 = parent & (u[:, 1] < 0.4)
        child2 = parent & ~child1 & (u[:, 1] < 0.7)
        free = u[:, 2] < 0.2
        acts = torch.stack([parent, child1, child2, free], 1).float()
        return acts @ self.feature_vectors_FD + self.bias_D, acts

    def sample(self, batch_size):
        return self.sample_with_features(batch_size)[0]

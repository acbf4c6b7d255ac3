"""Why sparsity causes absorption: the 2-feature parent/child toy (post "Sparsity is the enemy of
feature extraction", §7 of the spec).

Features f₁ (parent) and f₂ (child) are orthonormal, activation = sum of the active features
(magnitude 1), the child only fires with the parent: P(both) = p, P(parent only) = q,
P(neither) = 1 − p − q. An SAE with two latents, ReLU encoder, loss = E‖x − x̂‖² + λ·sparsity.
Two zero-error solutions:

    faithful   e₁ = d₁ = f₁, e₂ = d₂ = f₂                    codes: f₁ → (1, 0), f₁+f₂ → (1, 1)
    absorbing  e₁ = f₁ − f₂, d₁ = f₁;  e₂ = f₂, d₂ ∝ f₁ + f₂  codes: f₁ → (1, 0), f₁+f₂ → (0, ·)

Expected sparsity cost (MSE is 0 for both), with unit-norm decoder rows:

    L1:  faithful λ(q + 2p),  absorbing λ(q + √2·p)   (child code √2 along (f₁+f₂)/√2)
    L0:  faithful λ(q + 2p),  absorbing λ(q + p)

so for any λ > 0 and p > 0 the absorbing solution has the lower loss: the parent latent gets a
negative encoder weight on the child (it stops firing whenever the child does) and the child's
decoder carries the parent direction. A tied SAE (W_enc = W_decᵀ) cannot build that hole.

`absorption_losses` gives the closed form and checks it by evaluating the two constructed SAEs
on the four input states; `train_parent_child_toy` trains a tiny SAE on the toy and measures
whether it absorbed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from saelab.errors import ConfigError, require

PENALTIES = ("l1", "l0")


def _check_probs(p_both: float, p_parent_only: float) -> None:
    for name, v in (("p_both", p_both), ("p_parent_only", p_parent_only)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 <= v <= 1:
            raise ConfigError(name, v, "must be a probability in [0, 1]")
    require(
        p_both + p_parent_only <= 1 + 1e-12,
        "p_both + p_parent_only",
        p_both + p_parent_only,
        "must be at most 1 (they are disjoint events)",
    )


def _check_lam(lam: float) -> None:
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
        raise ConfigError("lam", lam, "must be a finite number ≥ 0")


def toy_states(p_both: float, p_parent_only: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The four input states in the (f₁, f₂) basis and their probabilities (both, parent only, neither, child only=0)."""
    x = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    p = torch.tensor([p_both, p_parent_only, 1.0 - p_both - p_parent_only], dtype=torch.float64)
    return x, p


def toy_solutions() -> dict[str, dict[str, torch.Tensor]]:
    """Encoder W_enc [D=2, L=2] and unit-norm decoder W_dec [L, D] of the two solutions (no biases)."""
    r = 1.0 / math.sqrt(2.0)
    return {
        "faithful": {
            "W_enc": torch.eye(2, dtype=torch.float64),
            "W_dec": torch.eye(2, dtype=torch.float64),
        },
        "absorbing": {
            # latent 0 (parent): fires on f₁ only; latent 1 (child): code √2 on f₂, decoder (f₁+f₂)/√2
            "W_enc": torch.tensor([[1.0, 0.0], [-1.0, math.sqrt(2.0)]], dtype=torch.float64),
            "W_dec": torch.tensor([[1.0, 0.0], [r, r]], dtype=torch.float64),
        },
    }


def evaluate_toy_solution(
    W_enc: torch.Tensor, W_dec: torch.Tensor, p_both: float, p_parent_only: float, lam: float, penalty: str = "l1"
) -> dict[str, float]:
    """Expected MSE, sparsity and total loss of a bias-free ReLU SAE on the exact toy distribution.

    Sparsity: L1 = Σ_j a_j·‖d_j‖ (SAELens's standard form) or L0 = #(a_j > 0)."""
    x, p = toy_states(p_both, p_parent_only)
    a = torch.relu(x @ W_enc)
    x_hat = a @ W_dec
    mse = ((x - x_hat) ** 2).sum(1)
    if penalty == "l1":
        sparsity = (a * W_dec.norm(dim=1)).sum(1)
    elif penalty == "l0":
        sparsity = (a > 1e-12).to(torch.float64).sum(1)
    else:
        raise ConfigError("penalty", penalty, f"must be one of {', '.join(PENALTIES)}")
    return {
        "mse": float((p * mse).sum()),
        "sparsity": float((p * sparsity).sum()),
        "loss": float((p * (mse + lam * sparsity)).sum()),
    }


@dataclass
class AbsorptionTheory:
    p_both: float
    p_parent_only: float
    lam: float
    penalty: str
    loss_faithful: float
    loss_absorbing: float
    evaluated_faithful: dict[str, float]
    evaluated_absorbing: dict[str, float]

    @property
    def advantage(self) -> float:
        """loss_faithful − loss_absorbing (> 0: absorption is preferred)."""
        return self.loss_faithful - self.loss_absorbing

    @property
    def preferred(self) -> str:
        if abs(self.advantage) <= 1e-15:
            return "tie"
        return "absorbing" if self.advantage > 0 else "faithful"

    def to_dict(self) -> dict[str, Any]:
        return {
            "p_both": self.p_both,
            "p_parent_only": self.p_parent_only,
            "lam": self.lam,
            "penalty": self.penalty,
            "loss_faithful": self.loss_faithful,
            "loss_absorbing": self.loss_absorbing,
            "advantage_of_absorbing": self.advantage,
            "preferred": self.preferred,
            "mse_faithful": self.evaluated_faithful["mse"],
            "mse_absorbing": self.evaluated_absorbing["mse"],
            "evaluated_loss_faithful": self.evaluated_faithful["loss"],
            "evaluated_loss_absorbing": self.evaluated_absorbing["loss"],
        }


def absorption_losses(p_both: float, p_parent_only: float, lam: float, penalty: str = "l1") -> AbsorptionTheory:
    """Closed-form expected loss of the faithful and the absorbing solution (and a direct check)."""
    _check_probs(p_both, p_parent_only)
    _check_lam(lam)
    if penalty not in PENALTIES:
        raise ConfigError("penalty", penalty, f"must be one of {', '.join(PENALTIES)}")
    p, q = float(p_both), float(p_parent_only)
    faithful = lam * (q + 2 * p)
    absorbing = lam * (q + (math.sqrt(2.0) if penalty == "l1" else 1.0) * p)
    sols = toy_solutions()
    ev_f = evaluate_toy_solution(sols["faithful"]["W_enc"], sols["faithful"]["W_dec"], p, q, lam, penalty)
    ev_a = evaluate_toy_solution(sols["absorbing"]["W_enc"], sols["absorbing"]["W_dec"], p, q, lam, penalty)
    return AbsorptionTheory(p, q, float(lam), penalty, faithful, absorbing, ev_f, ev_a)


# --------------------------------------------------------------------------------- training the toy
@dataclass
class ToyTrainingResult:
    tied: bool
    absorption_rate: float  # P(parent latent silent | both features active)
    parent_fires_on_parent_only: float  # P(parent latent fires | parent only)
    child_decoder_parent_cos: float  # cos(child latent's decoder, f₁)
    parent_encoder_child_weight: float  # parent latent's encoder weight on f₂ (negative: the hole)
    mse: float
    W_enc: torch.Tensor
    W_dec: torch.Tensor

    @property
    def absorbed(self) -> bool:
        return self.absorption_rate > 0.5 and self.child_decoder_parent_cos > 0.3

    def to_dict(self) -> dict[str, Any]:
        return {
            k: getattr(self, k)
            for k in (
                "tied",
                "absorption_rate",
                "parent_fires_on_parent_only",
                "child_decoder_parent_cos",
                "parent_encoder_child_weight",
                "mse",
            )
        } | {"absorbed": self.absorbed}


def train_parent_child_toy(
    tied: bool,
    p_both: float = 0.25,
    p_parent_only: float = 0.25,
    lam: float = 0.1,
    steps: int = 3000,
    batch_size: int = 256,
    lr: float = 1e-2,
    d: int = 8,
    seed: int = 0,
    init: str = "faithful",
    init_noise: float = 0.05,
) -> ToyTrainingResult:
    """Train a 2-latent ReLU SAE (loss MSE + λ·Σ a_j‖d_j‖, biases b_enc and b_dec) on the toy
    embedded in R^d, with Adam. `tied`: W_enc = W_decᵀ.

    `init="faithful"` starts at the true features (plus `init_noise`), so the outcome shows where
    the gradient leads from the correct solution (as in the Sparse-but-Wrong ground-truth-init
    experiment); `init="random"` often stalls in a poor 2-latent optimum (MSE ≈ 0.09).
    Measured (seeds 0–2, 2000 steps, lr 3e-3): at λ = 0.03 untied absorbs 3/3, tied 0/3; at
    λ ≥ 0.1 a tied SAE *can* partly absorb too, using its encoder bias as a threshold (1–3/3), so
    "tied cannot absorb" holds for small λ only.

    Latents are identified afterwards: the parent latent is the one whose decoder is closest to f₁
    among those firing on parent-only inputs; the child latent is the other one."""
    _check_probs(p_both, p_parent_only)
    _check_lam(lam)
    require(
        p_both > 0 and p_parent_only > 0,
        "p_both, p_parent_only",
        (p_both, p_parent_only),
        "both must be > 0 to train the toy",
    )
    g = torch.Generator().manual_seed(int(seed))
    basis, _ = torch.linalg.qr(torch.randn(d, 2, generator=g))
    f = basis.T.contiguous()  # [2, d] orthonormal features
    require(init in ("faithful", "random"), "init", init, "must be 'faithful' or 'random'")
    if init == "faithful":
        W_dec0 = f + init_noise * torch.randn(2, d, generator=g)
    else:
        W_dec0 = torch.randn(2, d, generator=g) / math.sqrt(d)
    W_dec = torch.nn.Parameter(W_dec0)
    b_enc = torch.nn.Parameter(torch.zeros(2))
    b_dec = torch.nn.Parameter(torch.zeros(d))
    params = [W_dec, b_enc, b_dec]
    W_enc = None
    if not tied:
        W_enc = torch.nn.Parameter(W_dec.detach().T.clone())
        params.append(W_enc)
    opt = torch.optim.Adam(params, lr=lr)
    probs = torch.tensor([p_both, p_parent_only, 1 - p_both - p_parent_only])
    states = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]])

    def forward(x: torch.Tensor):
        enc = W_dec.T if W_enc is None else W_enc  # W_enc is None exactly when tied
        a = torch.relu((x - b_dec) @ enc + b_enc)
        return a, a @ W_dec + b_dec

    for _ in range(steps):
        idx = torch.multinomial(probs, batch_size, replacement=True, generator=g)
        x = states[idx] @ f
        a, x_hat = forward(x)
        loss = ((x - x_hat) ** 2).sum(1).mean() + lam * (a * W_dec.norm(dim=1)).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    with torch.no_grad():
        x_all = states @ f
        a, x_hat = forward(x_all)
        act = a * W_dec.norm(dim=1)  # code in units of a unit-norm decoder
        unit_dec = W_dec / W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        cos_parent = unit_dec @ f[0]
        fires_parent_only = act[1] > 1e-3
        candidates = [j for j in range(2) if fires_parent_only[j]] or [0, 1]
        parent = max(candidates, key=lambda j: float(cos_parent[j]))
        child = 1 - parent
        enc = (W_dec.T if W_enc is None else W_enc).detach()
        mse = float((probs.double() * ((x_all - x_hat) ** 2).sum(1).double()).sum())
        return ToyTrainingResult(
            tied=tied,
            absorption_rate=float(act[0, parent] <= 1e-3),
            parent_fires_on_parent_only=float(act[1, parent] > 1e-3),
            child_decoder_parent_cos=float(cos_parent[child]),
            parent_encoder_child_weight=float(f[1] @ enc[:, parent]),
            mse=mse,
            W_enc=enc.clone(),
            W_dec=W_dec.detach().clone(),
        )

"""`sample_model` draws a seeded side stream: the same samples as before it moved onto
`saelab.seeding`, with the model's own stream and the global RNG left where they were."""

from __future__ import annotations

import torch

from saelab.diagnostics.data import sample_model
from saelab.synthetic import SyntheticModel, get_preset
from tests.diagnostics.diag_standins import TreeModel


def _old_sample_model(model, n, seed, with_features=False):
    """`sample_model` before `seeded_sampling` replaced its body."""
    gen = getattr(model, "generator", None)
    saved = gen.get_state() if isinstance(gen, torch.Generator) else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if saved is not None:
            gen.manual_seed(seed)
        try:
            return model.sample_with_features(n) if with_features else model.sample(n)
        finally:
            if saved is not None:
                gen.set_state(saved)


class GlobalRNGModel:
    """A model with no generator of its own: it samples from the global torch RNG."""

    hidden_dim = 3

    def sample(self, n):
        return torch.randn(n, 3)


def test_sample_model_is_bit_identical_to_before_and_restores_every_stream():
    torch.set_num_threads(1)
    for make in (lambda: SyntheticModel(get_preset("sbw-toy")), lambda: TreeModel(seed=2)):
        old_model, new_model, untouched = make(), make(), make()
        for with_features in (False, True):
            old = _old_sample_model(old_model, 40, 9, with_features)
            new = sample_model(new_model, 40, 9, with_features)
            for a, b in zip(old if with_features else [old], new if with_features else [new]):
                assert torch.equal(a, b)
        expected = untouched.sample(30)  # the own stream, never forked
        assert torch.equal(new_model.sample(30), expected) and torch.equal(old_model.sample(30), expected)

    torch.manual_seed(123)
    expected_next = torch.rand(4)
    torch.manual_seed(123)
    a = sample_model(GlobalRNGModel(), 5, seed=4)
    assert torch.equal(a, _old_sample_model(GlobalRNGModel(), 5, seed=4))
    assert torch.equal(torch.rand(4), expected_next)  # the global RNG is back where it was

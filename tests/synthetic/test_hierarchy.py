"""Hierarchy generation, compensation and the invariants of sampled activations."""

from __future__ import annotations

import pytest
import torch

from saelab.errors import ConfigError
from saelab.synthetic import (
    ConstantFiringProbabilityConfig,
    FullCorrelationConfig,
    Hierarchy,
    HierarchyConfig,
    HierarchyNode,
    SyntheticModel,
    generate_hierarchy,
    get_preset,
)
from tests.synthetic.synth_helpers import small_config


def test_synth_16k_forest_layout():
    h = generate_hierarchy(16_384, get_preset("synth-16k").hierarchy, seed=45)
    c = h.compiled
    # BFS index assignment: 128 roots, then 512, 2048, 8192 per level; features 10880+ are free.
    assert torch.equal(c.level_F[:128], torch.zeros(128, dtype=torch.long))
    assert torch.equal(c.level_F[128:640], torch.ones(512, dtype=torch.long))
    assert torch.equal(c.level_F[640:2688], torch.full((2048,), 2))
    assert torch.equal(c.level_F[2688:10880], torch.full((8192,), 3))
    assert (c.level_F[10880:] == -1).all()
    # The k-th child block belongs to the k-th parent of the level above.
    assert torch.equal(c.parent_F[128:640], torch.arange(128).repeat_interleave(4))
    assert torch.equal(c.parent_F[2688:10880], torch.arange(640, 2688).repeat_interleave(4))
    assert c.num_groups == 128 + 512 + 2048  # every parent is mutually exclusive
    assert c.has_rescale and bool(c.rescale_F[128:10880].all()) and not bool(c.rescale_F[:128].any())
    s = h.summary()
    assert s == {
        "num_roots": 128,
        "max_depth": 3,
        "num_features_in_hierarchy": 10880,
        "num_parent_features": 2688,
        "num_me_groups": 2688,
        "max_siblings": 4,
        "scale_children_by_parent": True,
        "features_per_depth": [128, 512, 2048, 8192],
    }


def test_random_branching_and_partial_mutual_exclusion_are_seeded():
    cfg = HierarchyConfig(
        total_root_nodes=5,
        branching_factor=(2, 4),
        max_depth=3,
        mutually_exclusive_portion=0.5,
        mutually_exclusive_min_depth=1,
    )
    a, b = generate_hierarchy(500, cfg, seed=3), generate_hierarchy(500, cfg, seed=3)
    assert a == b
    assert a != generate_hierarchy(500, cfg, seed=4)
    kids = [len(n.children) for n, _, depth, _ in a.iter_bfs() if depth < 3]
    assert min(kids) >= 2 and max(kids) <= 4
    me_depths = [depth for n, _, depth, _ in a.iter_bfs() if n.mutually_exclusive_children]
    eligible = sum(1 for n, _, depth, _ in a.iter_bfs() if 1 <= depth < 3 and len(n.children) >= 2)
    assert min(me_depths) >= 1 and len(me_depths) == int(eligible * 0.5)


def test_generation_stops_when_features_run_out():
    h = generate_hierarchy(10, HierarchyConfig(total_root_nodes=3, branching_factor=4, max_depth=2), seed=0)
    assert h.summary()["num_features_in_hierarchy"] == 10
    assert [len(r.children) for r in h.roots] == [4, 3, 0]


def test_compensation_hand_computed():
    # Root 0 (p=0.5) with mutually exclusive children 1 (p=0.1) and 2 (p=0.2); child 1 has child 3 (p=0.05).
    roots = [
        HierarchyNode(0, [HierarchyNode(1, [HierarchyNode(3)]), HierarchyNode(2)], mutually_exclusive_children=True)
    ]
    h = Hierarchy(roots, num_features=5)
    base = torch.tensor([0.5, 0.1, 0.2, 0.05, 0.3])
    f = h.probability_correction_factors(base)
    expected = torch.tensor(
        [
            1.0,  # root
            (1 / 0.5) * (1 + 0.2 / 0.5),  # 1/p_parent × (1 + Σ siblings / p_parent)
            (1 / 0.5) * (1 + 0.1 / 0.5),
            1 / 0.1,  # child of a non-ME parent: 1/p_parent only
            1.0,  # outside the forest
        ]
    )
    assert torch.allclose(f, expected, rtol=1e-6)


def test_hierarchy_dict_round_trip_and_errors():
    h = generate_hierarchy(
        60,
        HierarchyConfig(
            total_root_nodes=3,
            branching_factor=(2, 3),
            max_depth=2,
            mutually_exclusive_portion=1.0,
            scale_children_by_parent=True,
        ),
        seed=1,
    )
    again = Hierarchy.from_dict(h.to_dict(), 60)
    assert again == h
    assert torch.equal(again.compiled.me_group_F, h.compiled.me_group_F)
    bad = {"roots": [{"feature_index": 0, "children": [{"feature_index": 0}]}]}
    with pytest.raises(ConfigError, match="more than one node"):
        Hierarchy.from_dict(bad, 5)
    with pytest.raises(ConfigError, match="must be < num_features"):
        Hierarchy.from_dict({"roots": [{"feature_index": 9}]}, 5)
    with pytest.raises(ConfigError, match="mutually_exclusive_children"):
        Hierarchy.from_dict(
            {"roots": [{"feature_index": 0, "mutually_exclusive_children": True, "children": [{"feature_index": 1}]}]},
            5,
        )


def _check_invariants(model: SyntheticModel, acts_BF: torch.Tensor) -> None:
    c = model.hierarchy.compiled
    active = acts_BF > 0
    child = (c.parent_F >= 0).nonzero().squeeze(1)
    # A child is never active while its parent is off.
    assert not (active[:, child] & ~active[:, c.parent_F[child]]).any()
    # At most one active member per mutually-exclusive group.
    members = c.group_members_GS
    per_group = (active[:, members.clamp(min=0)] & (members >= 0)).sum(dim=2)
    assert int(per_group.max()) <= 1


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # low-rank copula, lazily drawn children
        {"correlation": None},  # independent firing
        {
            "num_features": 60,
            "hidden_dim": 16,
            "correlation": FullCorrelationConfig(matrix=(0.3 * torch.ones(60, 60) + 0.7 * torch.eye(60)).tolist()),
        },  # full matrix: children drawn up front
    ],
)
def test_children_need_parents_and_me_groups_keep_one(overrides):
    model = SyntheticModel(small_config(**overrides))
    for _ in range(3):
        _, acts = model.sample_sparse(4000)
        _check_invariants(model, acts.to_dense())
    # Mutual exclusion must actually bite: some groups have several siblings firing before the rule.
    assert model.hierarchy.compiled.num_groups > 0


def test_dense_reference_satisfies_invariants_too():
    model = SyntheticModel(small_config())
    _, acts_BF = model.sample_with_features(4000, reference=True)
    _check_invariants(model, acts_BF)


def test_scale_children_by_parent_rescales_exactly():
    # Deterministic magnitudes for every feature except the roots: then an active child's value
    # must be mean_child × parent_value / mean_parent, cascading down the tree.
    cfg = small_config(correlation=None, firing_probability=ConstantFiringProbabilityConfig(0.6))
    base = SyntheticModel(cfg)
    std = torch.zeros(cfg.num_features)
    roots = base.hierarchy.compiled.level_F == 0
    std[roots] = 1.0
    model = SyntheticModel.from_parts(
        cfg,
        feature_vectors_FD=base.feature_vectors_FD,
        bias_D=base.bias_D,
        firing_probabilities_F=base.firing_probabilities_F,
        hierarchy=base.hierarchy,
        mean_magnitudes_F=base.mean_magnitudes_F,
        std_magnitudes_F=std,
    )
    _, acts = model.sample_sparse(3000)
    a = acts.to_dense()
    c = model.hierarchy.compiled
    mean = model.mean_magnitudes_F
    child = (c.parent_F >= 0).nonzero().squeeze(1)
    on = a[:, child] > 0
    expected = mean[child] * a[:, c.parent_F[child]] / mean[c.parent_F[child]]
    assert on.sum() > 1000
    assert torch.allclose(a[:, child][on], expected[on], rtol=1e-5)


def test_without_scaling_children_keep_their_own_magnitude():
    cfg = small_config(
        correlation=None,
        hierarchy=HierarchyConfig(total_root_nodes=6, branching_factor=3, max_depth=2, scale_children_by_parent=False),
        std_firing_magnitudes=0.0,
    )
    model = SyntheticModel(cfg)
    _, acts = model.sample_sparse(2000)
    assert torch.allclose(acts.values, model.mean_magnitudes_F[acts.feature_idx])

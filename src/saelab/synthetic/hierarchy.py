"""Feature hierarchies: a forest whose children may only fire when their parent fires.

The tree is kept as nodes (for the SAELens-compatible `hierarchy.json`) and compiled to flat
per-feature arrays (`CompiledHierarchy`) that the samplers use.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from saelab.errors import ConfigError
from saelab.synthetic.config import HierarchyConfig


@dataclass(eq=True)
class HierarchyNode:
    """One node. `feature_index=None` is an organisational node with no feature of its own."""

    feature_index: int | None = None
    children: list[HierarchyNode] = field(default_factory=list)
    mutually_exclusive_children: bool = False
    scale_children_by_parent: bool = False
    feature_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "feature_index": self.feature_index,
            "mutually_exclusive_children": self.mutually_exclusive_children,
            "scale_children_by_parent": self.scale_children_by_parent,
            "feature_id": self.feature_id,
            "children": [c.to_dict() for c in self.children],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], path: str = "roots[?]") -> HierarchyNode:
        if not isinstance(d, dict):
            raise ConfigError(path, type(d).__name__, "must be a JSON object")
        idx = d.get("feature_index")
        if idx is not None and (not isinstance(idx, int) or isinstance(idx, bool) or idx < 0):
            raise ConfigError(f"{path}.feature_index", idx, "must be a non-negative integer or null")
        children_raw = d.get("children", [])
        if not isinstance(children_raw, list):
            raise ConfigError(f"{path}.children", type(children_raw).__name__, "must be a list")
        children = [cls.from_dict(c, f"{path}.children[{k}]") for k, c in enumerate(children_raw)]
        me = d.get("mutually_exclusive_children", False)
        if me and len(children) < 2:
            raise ConfigError(f"{path}.mutually_exclusive_children", me, "needs at least 2 children")
        return cls(
            feature_index=idx,
            children=children,
            mutually_exclusive_children=bool(me),
            scale_children_by_parent=bool(d.get("scale_children_by_parent", False)),
            feature_id=d.get("feature_id", d.get("id")),
        )


@dataclass
class CompiledHierarchy:
    """Flat per-feature view of a forest, on one device.

    level_F: BFS depth of the feature's node (-1 = not in the hierarchy); parent_F: nearest
    ancestor that has a feature (-1 = none); rescale_F: the immediate parent node scales its
    children by parent_act / parent_mean instead of gating them; me_group_F / me_slot_F: the
    mutually-exclusive sibling group a feature belongs to and its position in it (-1 = none).
    Groups are numbered in BFS order of their parent, so group ids rise with depth.
    """

    num_features: int
    level_F: torch.Tensor
    parent_F: torch.Tensor
    rescale_F: torch.Tensor
    me_group_F: torch.Tensor
    me_slot_F: torch.Tensor
    group_parent_G: torch.Tensor
    group_level_G: torch.Tensor
    group_members_GS: torch.Tensor
    max_level: int
    num_groups: int
    max_siblings: int
    has_rescale: bool

    def to(self, device: torch.device | str) -> CompiledHierarchy:
        moved: dict[str, Any] = {
            k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()
        }
        return CompiledHierarchy(**moved)


class Hierarchy:
    """A validated forest of HierarchyNode trees over features [0, num_features)."""

    def __init__(self, roots: list[HierarchyNode], num_features: int):
        self.roots = list(roots)
        self.num_features = num_features
        self.compiled = self._compile()

    # ---------------------------------------------------------------- structure
    def iter_bfs(self) -> list[tuple[HierarchyNode, int, int, bool]]:
        """(node, effective parent feature, depth, parent scales children) in breadth-first order."""
        out = []
        queue: deque[tuple[HierarchyNode, int, int, bool]] = deque((r, -1, 0, False) for r in self.roots)
        while queue:
            node, parent, depth, rescale = queue.popleft()
            out.append((node, parent, depth, rescale))
            eff = node.feature_index if node.feature_index is not None else parent
            for child in node.children:
                queue.append((child, eff, depth + 1, node.scale_children_by_parent))
        return out

    def _compile(self) -> CompiledHierarchy:
        F = self.num_features
        feats: list[int] = []
        depths: list[int] = []
        parents: list[int] = []
        rescales: list[bool] = []
        groups: list[tuple[int, int, list[int]]] = []  # (parent feature or -1, children depth, members)
        seen: set[int] = set()
        seen_nodes: set[int] = set()
        for node, parent, depth, rescale in self.iter_bfs():
            if id(node) in seen_nodes:
                raise ConfigError("hierarchy", node.feature_index, "a node appears twice (loop or shared child)")
            seen_nodes.add(id(node))
            idx = node.feature_index
            if idx is not None:
                if idx >= F:
                    raise ConfigError("hierarchy.feature_index", idx, f"must be < num_features ({F})")
                if idx in seen:
                    raise ConfigError("hierarchy.feature_index", idx, "appears in more than one node")
                seen.add(idx)
                feats.append(idx)
                depths.append(depth)
                parents.append(parent)
                rescales.append(rescale and parent >= 0)
            if node.mutually_exclusive_children:
                members = [c.feature_index for c in node.children if c.feature_index is not None]
                if len(members) >= 2:
                    groups.append((idx if idx is not None else -1, depth + 1, members))
        # Python lists first, one tensor write each: per-element tensor writes are slow.
        feats_t = torch.tensor(feats, dtype=torch.long)
        level_F = torch.full((F,), -1, dtype=torch.long)
        parent_F = torch.full((F,), -1, dtype=torch.long)
        rescale_F = torch.zeros(F, dtype=torch.bool)
        level_F[feats_t] = torch.tensor(depths, dtype=torch.long)
        parent_F[feats_t] = torch.tensor(parents, dtype=torch.long)
        rescale_F[feats_t] = torch.tensor(rescales, dtype=torch.bool)
        G = len(groups)
        S = max((len(m) for _, _, m in groups), default=0)
        members_GS = torch.tensor([m + [-1] * (S - len(m)) for _, _, m in groups], dtype=torch.long).reshape(G, S)
        me_group_F = torch.full((F,), -1, dtype=torch.long)
        me_slot_F = torch.full((F,), -1, dtype=torch.long)
        valid = members_GS >= 0
        me_group_F[members_GS[valid]] = torch.arange(G).unsqueeze(1).expand(G, S)[valid]
        me_slot_F[members_GS[valid]] = torch.arange(S).unsqueeze(0).expand(G, S)[valid]
        return CompiledHierarchy(
            num_features=F,
            level_F=level_F,
            parent_F=parent_F,
            rescale_F=rescale_F,
            me_group_F=me_group_F,
            me_slot_F=me_slot_F,
            group_parent_G=torch.tensor([p for p, _, _ in groups], dtype=torch.long),
            group_level_G=torch.tensor([lv for _, lv, _ in groups], dtype=torch.long),
            group_members_GS=members_GS,
            max_level=max(depths, default=-1),
            num_groups=G,
            max_siblings=S,
            has_rescale=any(rescales),
        )

    @property
    def feature_indices(self) -> torch.Tensor:
        return (self.compiled.level_F >= 0).nonzero().squeeze(1)

    # ---------------------------------------------------------------- probabilities
    def probability_correction_factors(self, base_probs_F: torch.Tensor) -> torch.Tensor:
        """Factors that undo the firing-rate loss from gating and mutual exclusion (as SAELens).

        Child i of parent P: 1 / p_P; if i is in a mutually-exclusive group, also
        × (1 + Σ_{siblings j≠i} p_j / p_P). Roots and features outside the forest get 1.
        """
        factors_F = torch.ones(base_probs_F.shape[0], dtype=base_probs_F.dtype)
        base = base_probs_F.tolist()
        # Iterative post-order so deep trees cannot hit the recursion limit; same arithmetic as SAELens.
        stack: list[tuple[HierarchyNode, float, bool]] = [(r, 1.0, False) for r in reversed(self.roots)]
        node_prob: dict[int, float] = {}
        while stack:
            node, parent_prob, done = stack.pop()
            if not done:
                if node.feature_index is not None:
                    if parent_prob > 0:
                        factors_F[node.feature_index] = 1.0 / parent_prob
                    prob = base[node.feature_index]
                else:
                    prob = parent_prob
                node_prob[id(node)] = prob
                stack.append((node, parent_prob, True))
                for child in reversed(node.children):
                    stack.append((child, prob, False))
                continue
            prob = node_prob[id(node)]
            if node.mutually_exclusive_children and len(node.children) >= 2:
                kids = [(c.feature_index, base[c.feature_index]) for c in node.children if c.feature_index is not None]
                if len(kids) >= 2 and prob > 0:
                    total = sum(p for _, p in kids)
                    for idx, p in kids:
                        factors_F[idx] *= 1.0 + max(0.0, total - p) / prob
        return factors_F

    # ---------------------------------------------------------------- persistence
    def to_dict(self) -> dict[str, Any]:
        return {"roots": [r.to_dict() for r in self.roots]}

    @classmethod
    def from_dict(cls, d: dict[str, Any], num_features: int) -> Hierarchy:
        if not isinstance(d, dict) or not isinstance(d.get("roots"), list):
            raise ConfigError("hierarchy", type(d).__name__, "must be an object with a 'roots' list")
        return cls([HierarchyNode.from_dict(r, f"roots[{k}]") for k, r in enumerate(d["roots"])], num_features)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Hierarchy) and self.roots == other.roots

    # ---------------------------------------------------------------- summary
    def summary(self) -> dict[str, Any]:
        c = self.compiled
        in_h = c.level_F >= 0
        has_children = torch.zeros(c.num_features, dtype=torch.bool)
        parents = c.parent_F[c.parent_F >= 0]
        has_children[parents] = True
        return {
            "num_roots": len(self.roots),
            "max_depth": c.max_level,
            "num_features_in_hierarchy": int(in_h.sum()),
            "num_parent_features": int(has_children.sum()),
            "num_me_groups": c.num_groups,
            "max_siblings": c.max_siblings,
            "scale_children_by_parent": c.has_rescale,
            "features_per_depth": [int((c.level_F == d).sum()) for d in range(c.max_level + 1)],
        }


def generate_hierarchy(num_features: int, config: HierarchyConfig, seed: int | None = None) -> Hierarchy:
    """Breadth-first forest, draw for draw the same as SAELens's `generate_hierarchy`.

    Roots take features 0..R-1, then each level's children take the next consecutive indices
    (parents in order). Random draws (Python `random`, seeded): one `randint` per parent when
    the branching factor is a range, then one `sample` choosing the mutually-exclusive parents.
    """
    rng = random.Random(seed)
    next_idx = 0

    def take() -> int | None:
        nonlocal next_idx
        if next_idx >= num_features:
            return None
        next_idx += 1
        return next_idx - 1

    roots: list[HierarchyNode] = []
    parents_with_depth: list[tuple[HierarchyNode, int]] = []
    for _ in range(config.total_root_nodes):
        idx = take()
        if idx is None:
            break
        roots.append(HierarchyNode(feature_index=idx))
        parents_with_depth.append((roots[-1], 0))

    level: list[tuple[HierarchyNode, int]] = [(r, 0) for r in roots]
    while level:
        next_level: list[tuple[HierarchyNode, int]] = []
        for parent, depth in level:
            if depth >= config.max_depth:
                continue
            bf = config.branching_factor
            n_children = bf if isinstance(bf, int) else rng.randint(bf[0], bf[1])
            for _ in range(n_children):
                idx = take()
                if idx is None:
                    break
                child = HierarchyNode(feature_index=idx)
                if depth + 1 < config.max_depth:  # an inner node: may get children of its own
                    next_level.append((child, depth + 1))
                    parents_with_depth.append((child, depth + 1))
                parent.children.append(child)
        level = next_level

    lo, hi = config.mutually_exclusive_min_depth, config.mutually_exclusive_max_depth
    eligible = [n for n, d in parents_with_depth if d >= lo and (hi is None or d <= hi) and len(n.children) >= 2]
    num_me = int(len(eligible) * config.mutually_exclusive_portion)
    if num_me > 0:
        for k in rng.sample(range(len(eligible)), num_me):
            eligible[k].mutually_exclusive_children = True
    if config.scale_children_by_parent:
        for node, _ in parents_with_depth:
            node.scale_children_by_parent = True
    return Hierarchy(roots, num_features)

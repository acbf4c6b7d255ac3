"""Applying a feature hierarchy to sampled activations: a sparse fast path and a dense reference.

SAELens draws every feature for every sample, then, level by level, zeroes (or rescales by
parent_act / parent_mean) children of inactive parents and keeps one random active sibling per
mutually-exclusive group. Given the copula's shared factor ε, each cell's firing, magnitude and
tie-break are independent of everything else, so a child only has to be drawn where its parent
is still active: the sparse path expands alive parents into their children level by level
("lazy children"), which is what makes hierarchical models cheap to sample.

So that the dense reference (which draws every child cell, as SAELens does) sees exactly the
same random numbers, children's per-cell randomness is counter-based: U = hash(batch key, cell).
The two paths therefore return identical samples. With a full (dense) correlation matrix there
is no shared ε, so children are drawn with everything else and only gated afterwards.
"""

from __future__ import annotations

import torch

from saelab.synthetic.hierarchy import CompiledHierarchy
from saelab.synthetic.sampling import hash_uniform, mix64_int, take

_STREAM_FIRE, _STREAM_MAG, _STREAM_ME = 1, 2, 3


def _stream_key(batch_key: int, stream: int) -> int:
    return mix64_int(batch_key * 4 + stream)


class HierarchySampler:
    """Hierarchy + lazy children for one model, on one device."""

    def __init__(
        self,
        compiled: CompiledHierarchy,
        *,
        lazy: bool,
        thresholds_F: torch.Tensor,
        scale_F: torch.Tensor,
        factor_FR: torch.Tensor | None,
        mean_F: torch.Tensor,
        std_F: torch.Tensor,
    ):
        self.h = compiled
        self.lazy = lazy
        F = compiled.num_features
        self.lazy_F = (compiled.parent_F >= 0) if lazy else torch.zeros(F, dtype=torch.bool)
        # Lazy children of one parent entry are contiguous; groups under organisational nodes
        # (no parent feature) hold up-front entries and are not.
        self.contiguous_groups = lazy and bool((compiled.group_parent_G >= 0).all())
        self.thresholds64_F = thresholds_F.to(torch.float64)
        self.scale64_F = scale_F.to(torch.float64)
        self.factor64_FR = factor_FR.to(torch.float64) if factor_FR is not None else None
        self.mean_F = mean_F.float()
        self.std_F = std_F.float()
        # Per level: CSR of lazy children by (effective) parent feature.
        self.csr: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for level in range(1, compiled.max_level + 1):
            kids = (self.lazy_F & (compiled.level_F == level)).nonzero().squeeze(1)
            parents = compiled.parent_F[kids]
            order = torch.argsort(parents, stable=True)
            kids, parents = kids[order], parents[order]
            ptr = torch.zeros(F + 1, dtype=torch.long)
            ptr[1:] = torch.cumsum(torch.bincount(parents, minlength=F), 0)
            self.csr[level] = (ptr, kids)

    def to(self, device: torch.device | str) -> HierarchySampler:
        out = HierarchySampler.__new__(HierarchySampler)
        for k, v in self.__dict__.items():
            if isinstance(v, torch.Tensor):
                v = v.to(device)
            elif k == "h":
                v = v.to(device)
            elif k == "csr":
                v = {lv: (p.to(device), c.to(device)) for lv, (p, c) in v.items()}
            setattr(out, k, v)
        return out

    # ---------------------------------------------------------------- child cells
    def _child_fire(
        self, rows: torch.Tensor, feats: torch.Tensor, eps_BR: torch.Tensor | None, batch_key: int
    ) -> torch.Tensor:
        """Whether each lazy child cell (rows[k], feats[k]) fires, from its own counter-based uniform."""
        t = take(self.thresholds64_F, feats)
        if self.factor64_FR is not None and eps_BR is not None:
            m = (take(eps_BR.to(torch.float64), rows) * take(self.factor64_FR, feats)).sum(dim=-1)
            t = t - m
        c = t / take(self.scale64_F, feats)
        cell = rows * self.h.num_features + feats
        return hash_uniform(cell, _stream_key(batch_key, _STREAM_FIRE)) < torch.special.ndtr(-c)

    def _child_magnitude(self, rows: torch.Tensor, feats: torch.Tensor, batch_key: int) -> torch.Tensor:
        """ReLU(μ + σ·z) for child cells, z = Φ⁻¹(counter-based uniform of the cell)."""
        cell = rows * self.h.num_features + feats
        noise = torch.special.ndtri(hash_uniform(cell, _stream_key(batch_key, _STREAM_MAG))).float()
        return (take(self.mean_F, feats) + take(self.std_F, feats) * noise).relu()

    # ---------------------------------------------------------------- sparse path
    @torch.no_grad()
    def apply_sparse(
        self, b: torch.Tensor, f: torch.Tensor, v: torch.Tensor, eps_BR: torch.Tensor | None, batch_key: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Free entries (b, f, v > 0, sorted) in; final entries sorted by (b, f) out."""
        h = self.h
        F = h.num_features
        device = f.device
        alive = torch.ones(f.numel(), dtype=torch.bool, device=device)
        free_key = b * F + f  # sorted: used to find parents among the free entries
        n_free = f.numel()
        for level in range(1, h.max_level + 1):
            if not self.lazy:
                self._gate_free_entries(b, f, v, alive, free_key, n_free, level)
            else:
                b, f, v, alive = self._expand_children(b, f, v, alive, eps_BR, batch_key, level)
            if h.num_groups:
                self._resolve_me(b, f, alive, level, batch_key)
        keep = (alive & (v > 0)).nonzero().squeeze(1)
        b, f, v = take(b, keep), take(f, keep), take(v, keep)
        _, order = torch.sort(b * F + f)
        return take(b, order), take(f, order), take(v, order)

    def _gate_free_entries(
        self,
        b: torch.Tensor,
        f: torch.Tensor,
        v: torch.Tensor,
        alive: torch.Tensor,
        key: torch.Tensor,
        n: int,
        level: int,
    ) -> None:
        h = self.h
        sel = ((h.level_F[f] == level) & (h.parent_F[f] >= 0)).nonzero().squeeze(1)
        if sel.numel() == 0 or n == 0:
            return
        par = h.parent_F[f[sel]]
        pkey = b[sel] * h.num_features + par
        ppos = torch.searchsorted(key, pkey).clamp(max=n - 1)
        found = (key[ppos] == pkey) & alive[ppos]
        alive[sel[~found]] = False
        if h.has_rescale:
            rs = h.rescale_F[f[sel]] & found
            idx, pidx = sel[rs], ppos[rs]
            v[idx] = v[idx] * (v[pidx] / self.mean_F[par[rs]])

    def _expand_children(
        self,
        b: torch.Tensor,
        f: torch.Tensor,
        v: torch.Tensor,
        alive: torch.Tensor,
        eps_BR: torch.Tensor | None,
        batch_key: int,
        level: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        ptr, kids = self.csr[level]
        if kids.numel() == 0:
            return b, f, v, alive
        start = take(ptr, f)
        n_kids = (take(ptr, f + 1) - start) * alive
        par_ent = n_kids.nonzero().squeeze(1)
        if par_ent.numel() == 0:
            return b, f, v, alive
        counts = take(n_kids, par_ent)
        total = int(counts.sum())
        # Expand each alive parent entry into its children: CSR walk without a Python loop.
        pe = torch.repeat_interleave(par_ent, counts, output_size=total)
        first = torch.cumsum(counts, 0) - counts
        within = torch.arange(total, device=f.device) - torch.repeat_interleave(first, counts, output_size=total)
        child = take(kids, take(start, pe) + within)
        rows = take(b, pe)
        fired = self._child_fire(rows, child, eps_BR, batch_key).nonzero().squeeze(1)
        pe, child, rows = take(pe, fired), take(child, fired), take(rows, fired)
        # Magnitudes only for the cells that fired (the dense path computes them everywhere,
        # from the same per-cell uniforms).
        val = self._child_magnitude(rows, child, batch_key)
        on = (val > 0).nonzero().squeeze(1)
        pe, child, rows, val = take(pe, on), take(child, on), take(rows, on), take(val, on)
        if self.h.has_rescale:
            rs = take(self.h.rescale_F, child)
            val = torch.where(rs, val * (take(v, pe) / take(self.mean_F, take(f, pe))), val)
        new_alive = torch.ones(child.numel(), dtype=torch.bool, device=f.device)
        return torch.cat([b, rows]), torch.cat([f, child]), torch.cat([v, val]), torch.cat([alive, new_alive])

    def _resolve_me(self, b: torch.Tensor, f: torch.Tensor, alive: torch.Tensor, level: int, batch_key: int) -> None:
        """Keep one uniformly random alive member per (sample, group) among groups at `level`."""
        h = self.h
        grp = take(h.me_group_F, f)
        sel = ((grp >= 0) & alive & (take(h.level_F, f) == level)).nonzero().squeeze(1)
        if sel.numel() < 2:
            return
        gkey = take(b, sel) * h.num_groups + take(grp, sel)
        if self.contiguous_groups:
            # Members of one (sample, group) are the fired children of one parent entry, which the
            # expansion emits next to each other: an O(n) run-length pass instead of a sort.
            _, inv, counts = torch.unique_consecutive(gkey, return_inverse=True, return_counts=True)
        else:
            _, inv, counts = torch.unique(gkey, sorted=True, return_inverse=True, return_counts=True)
        conflict = (take(counts, inv) > 1).nonzero().squeeze(1)
        if conflict.numel() == 0:
            return
        ent, uid, gk = take(sel, conflict), take(inv, conflict), take(gkey, conflict)
        slot = take(h.me_slot_F, take(f, ent))
        score = hash_uniform(gk * h.max_siblings + slot, _stream_key(batch_key, _STREAM_ME))
        n_u = counts.numel()
        best = torch.full((n_u,), -1.0, dtype=score.dtype, device=f.device).scatter_reduce(0, uid, score, "amax")
        is_best = score == take(best, uid)
        # Ties (vanishingly rare) go to the lowest slot, as argmax does in the dense reference.
        min_slot = torch.full((n_u,), h.max_siblings, dtype=torch.long, device=f.device).scatter_reduce(
            0, uid[is_best], slot[is_best], "amin"
        )
        winner = is_best & (slot == take(min_slot, uid))
        alive[ent[~winner]] = False

    # ---------------------------------------------------------------- dense reference
    @torch.no_grad()
    def apply_dense(self, acts_BF: torch.Tensor, eps_BR: torch.Tensor | None, batch_key: int) -> torch.Tensor:
        """SAELens's dense algorithm on a B×F tensor of free-feature activations (reference path)."""
        h = self.h
        acts = acts_BF.clone()
        B = acts.shape[0]
        device = acts.device
        if self.lazy:
            kids = self.lazy_F.nonzero().squeeze(1)
            if kids.numel():
                acts[:, kids] = self._dense_child_values(B, kids, eps_BR, batch_key)
        me_key = _stream_key(batch_key, _STREAM_ME)
        for level in range(1, h.max_level + 1):
            feats = ((h.level_F == level) & (h.parent_F >= 0)).nonzero().squeeze(1)
            if feats.numel():
                parents = h.parent_F[feats]
                parent_vals = acts[:, parents]
                active = parent_vals > 0
                factor = active.to(acts.dtype)
                if h.has_rescale:
                    scale = torch.where(active, parent_vals / self.mean_F[parents], torch.zeros_like(parent_vals))
                    factor = torch.where(h.rescale_F[feats], scale, factor)
                acts[:, feats] = acts[:, feats] * factor
            groups = (h.group_level_G == level).nonzero().squeeze(1)
            if groups.numel() == 0:
                continue
            members = h.group_members_GS[groups]  # (Gl, S), -1 padded
            sib = (acts[:, members.clamp(min=0)] > 0) & (members >= 0)  # (B, Gl, S)
            rows, gis = (sib.sum(dim=2) > 1).nonzero(as_tuple=True)
            if rows.numel() == 0:
                continue
            S = h.max_siblings
            gk = rows * h.num_groups + groups[gis]
            slots = torch.arange(S, device=device)
            scores = hash_uniform(gk.unsqueeze(1) * S + slots, me_key)
            active = sib[rows, gis]
            winner = torch.where(active, scores, torch.full_like(scores, -1.0)).argmax(dim=1)
            losers = active.clone()
            losers[torch.arange(rows.numel(), device=device), winner] = False
            li, ls = losers.nonzero(as_tuple=True)
            acts[rows[li], members[gis[li], ls]] = 0
        return acts.relu()

    def _dense_child_values(
        self, B: int, kids: torch.Tensor, eps_BR: torch.Tensor | None, batch_key: int
    ) -> torch.Tensor:
        """Every child cell's value before gating (0 where it does not fire): B × len(kids).

        Same per-cell computation as the sparse path, in row chunks to bound memory.
        """
        K = kids.numel()
        R = self.factor64_FR.shape[1] if self.factor64_FR is not None else 1
        rows_per_chunk = max(1, (1 << 22) // (K * R))
        out = torch.empty(B, K, dtype=self.mean_F.dtype, device=kids.device)
        for r0 in range(0, B, rows_per_chunk):
            r1 = min(B, r0 + rows_per_chunk)
            rows = torch.arange(r0, r1, device=kids.device).repeat_interleave(K)
            feats = kids.repeat(r1 - r0)
            fire = self._child_fire(rows, feats, eps_BR, batch_key)
            out[r0:r1] = (self._child_magnitude(rows, feats, batch_key) * fire).view(r1 - r0, K)
        return out

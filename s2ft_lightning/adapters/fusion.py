"""Fuse several S²FT adapters into one (sum, weighted sum, or mean where they overlap), with a report."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from s2ft_lightning.adapters.format import Adapter, AdapterError, BaseCheck, BlockDelta


@dataclass
class FusionReport:
    """Where fused adapters overlap: per block key, the shared indices and which adapters share them."""

    overlaps: dict[str, dict[int, list[str]]] = field(default_factory=dict)
    cross: dict[str, int] = field(default_factory=dict)  # module -> elements touched by rows AND columns
    mode: str = "sum"

    @property
    def num_overlapping(self) -> int:
        return sum(len(v) for v in self.overlaps.values())

    def summary(self) -> str:
        if not self.overlaps and not self.cross:
            return "no overlapping rows/columns"
        parts = [f"{k}: {len(v)} shared indices" for k, v in self.overlaps.items()]
        parts += [f"{m}: {n} elements in both a row and a column block" for m, n in self.cross.items()]
        return f"overlaps resolved by {self.mode}: " + "; ".join(parts)


def _expert_facts(adapters: Sequence[Adapter], key: str) -> dict:
    out: dict = {}
    for a in adapters:
        out.update(a.metadata.get(key) or {})
    return out


def fuse_adapters(
    adapters: Mapping[str, Adapter] | Sequence[Adapter],
    weights: Sequence[float] | None = None,
    overlap: Literal["sum", "mean"] = "sum",
    name: str | None = None,
) -> tuple[Adapter, FusionReport]:
    """Combine adapters into one: ``Σ w_i·delta_i``; with ``overlap="mean"`` shared elements are averaged."""
    if not isinstance(adapters, Mapping):
        adapters = {a.name or f"adapter{i}": a for i, a in enumerate(adapters)}
    names, items = list(adapters), list(adapters.values())
    if not items:
        raise AdapterError("fuse_adapters needs at least one adapter")
    if overlap not in ("sum", "mean"):
        raise AdapterError(f"overlap={overlap!r} must be 'sum' or 'mean'")
    weights = [1.0] * len(items) if weights is None else [float(w) for w in weights]
    if len(weights) != len(items):
        raise AdapterError(f"{len(weights)} weights given for {len(items)} adapters")
    first = items[0]
    shapes, kinds = dict(first.module_shapes), dict(first.module_kinds)
    for n, a in zip(names, items):
        if a.base_fingerprint != first.base_fingerprint:
            raise AdapterError(
                f"adapter {n!r} was made for another base ({a.base_fingerprint} != {first.base_fingerprint})"
            )
        for m, s in a.module_shapes.items():
            if shapes.setdefault(m, s) != s:
                raise AdapterError(f"adapter {n!r} disagrees on the shape of {m!r}")
            kinds.setdefault(m, a.module_kinds[m])

    report = FusionReport(mode=overlap)
    groups: dict[tuple[str, str], list[tuple[str, float, BlockDelta]]] = {}
    for n, w, a in zip(names, weights, items):
        for b in a.blocks:
            groups.setdefault((b.module, b.feature), []).append((n, w, b))
    fused: dict[tuple[str, str], tuple[list[int], torch.Tensor, torch.Tensor]] = {}
    for (module, feature), parts in groups.items():
        axis = 0 if feature == "out" else 1
        union = sorted({i for _, _, b in parts for i in b.indices})
        pos = {i: j for j, i in enumerate(union)}
        out_f, in_f = shapes[module]
        size = (len(union), in_f) if feature == "out" else (out_f, len(union))
        total = torch.zeros(size)
        counts = torch.zeros(len(union))
        owners: dict[int, list[str]] = {}
        for n, w, b in parts:
            dst = torch.tensor([pos[i] for i in b.indices])
            total.index_add_(axis, dst, b.delta * w)
            counts[dst] += 1
            for i in b.indices:
                owners.setdefault(i, []).append(n)
        shared = {i: ns for i, ns in owners.items() if len(ns) > 1}
        if shared:
            report.overlaps[f"{module}.{'rows' if feature == 'out' else 'cols'}"] = shared
        fused[(module, feature)] = (union, total, counts)
    for module in {m for m, _ in fused}:
        r, c = fused.get((module, "out")), fused.get((module, "in"))
        if r is not None and c is not None:
            report.cross[module] = len(r[0]) * len(c[0])
        if overlap != "mean":
            continue
        out_f, in_f = shapes[module]
        row_n, col_n = torch.zeros(out_f), torch.zeros(in_f)  # how many blocks touch each row / column
        if r is not None:
            row_n[torch.tensor(r[0])] = r[2]
        if c is not None:
            col_n[torch.tensor(c[0])] = c[2]
        if r is not None:  # element (i, j) is touched by row_n[i] + col_n[j] blocks
            r[1].div_(row_n[torch.tensor(r[0])][:, None] + col_n[None, :])
        if c is not None:
            c[1].div_(col_n[torch.tensor(c[0])][None, :] + row_n[:, None])

    blocks = []
    for (module, feature), (union, total, _) in sorted(fused.items()):
        checks: list[BaseCheck] = []
        seen = set()
        for _, _, b in groups[(module, feature)]:
            for ch in b.base_checks:
                ch = BaseCheck(ch.dtype, ch.sha256, ch.sha256_bf16, list(ch.indices or b.indices))
                key = (tuple(ch.indices), ch.sha256)
                if key not in seen:
                    seen.add(key)
                    checks.append(ch)
        blocks.append(BlockDelta(module, feature, union, total.contiguous(), checks))
    used = {m for m, _ in fused}
    result = Adapter(
        blocks,
        first.base_fingerprint,
        {m: shapes[m] for m in used},
        {m: kinds[m] for m in used},
        base_model=first.base_model,
        name=name,
        metadata={
            # the base's facts (one base: the fingerprints agree), for the LoRA export
            **{k: first.metadata[k] for k in ("architecture", "encoder_decoder") if k in first.metadata},
            **{k: facts for k in ("expert_counts", "expert_storage") if (facts := _expert_facts(items, k))},
            "fused_from": names,
            "weights": weights,
            "overlap": overlap,
        },
    )
    result.validate()
    return result, report

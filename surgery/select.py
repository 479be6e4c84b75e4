"""Choose which heads / channels S²FT trains: per-role budgets, per-layer allocation, scoring strategies.

Indices are returned in the ORIGINAL index space at each role's member level: q heads for ``o``,
kv heads (groups) for ``v`` under GQA, channels for ``up``/``down``. Data-driven scores are computed
in eval mode and leave no ``.grad``, ``requires_grad`` or training-flag change behind.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from surgery.config import RATIO_KEYS, STRATEGIES, SelectionConfig, SelectionError, resolve
from surgery.linear import split_expert_name
from surgery.permute import member_index, pinned_view
from surgery.structures import Coupling, Member, ModelStructures
from surgery.transaction import deferred_interrupts
from surgery.verify import eval_mode

Selection = dict[str, dict[str, list[int]]]
__all__ = ["STRATEGIES", "Selection", "SelectionConfig", "SelectionError", "role_level_size", "role_members", "select"]


def role_members(coupling: Coupling, role: str) -> list[Member]:
    """Members of ``role`` that sit on a linear module's feature axis (the ones S²FT can slice)."""
    return [m for m in coupling.by_role(role) if m.module is not None and m.feature is not None]


def role_level_size(coupling: Coupling, role: str) -> int:
    """How many indices ``role`` has in ``coupling`` (kv groups for group-level members under GQA)."""
    ms = coupling.by_role(role)
    group = coupling.group_size > 1 and any(m.level == "group" for m in ms)
    return coupling.num_groups if group else coupling.size


def _round(x: float) -> int:
    return int(math.floor(x + 0.5))


def _allocate(sizes: Sequence[int], ratio: float, allocation: str, gen: torch.Generator) -> list[int]:
    """Per-coupling counts: 'even' rounds ratio×size per layer (≥1); 'global' spreads the total randomly."""
    if allocation == "even":
        return [min(n, max(1, _round(ratio * n))) for n in sizes]
    total_units = sum(sizes)
    total = min(total_units, max(1, _round(ratio * total_units)))
    owner = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    picked = owner[torch.randperm(total_units, generator=gen)[:total]]
    return torch.bincount(picked, minlength=len(sizes)).tolist()


def _slice_sq(t: torch.Tensor, m: Member) -> torch.Tensor:
    """Per-index sum of squares of member ``m``'s slices of tensor ``t`` (shape: m.count)."""
    view, axis = pinned_view(t, m)
    v = view.detach().float().movedim(axis, 0)
    per_el = v.pow(2).reshape(v.shape[0], -1).sum(1)
    return _gather_units(per_el, m)


def _gather_units(per_feature: torch.Tensor, m: Member) -> torch.Tensor:
    idx = member_index(m, range(m.count))
    return per_feature[idx.to(per_feature.device)].sum(1).cpu()


def _batches(calibration: Iterable[Any]) -> Iterable[dict[str, torch.Tensor]]:
    for b in calibration:
        if isinstance(b, torch.Tensor):
            b = {"input_ids": b if b.dim() == 2 else b.unsqueeze(0)}
        elif not isinstance(b, Mapping) or "input_ids" not in b:
            raise SelectionError("each calibration batch must be a token-id tensor or a dict with 'input_ids'")
        yield dict(b)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _activation_sq(model: torch.nn.Module, keys: set[tuple[str, str]], calibration) -> dict:
    """Sum over calibration tokens of squared activations per feature, for each (module, feature)."""
    acc: dict[tuple[str, str], torch.Tensor] = {}
    hooks = []

    def make(name: str):
        def hook(mod, args, out):
            for feat, x in (("in", args[0] if args else None), ("out", out)):
                if (name, feat) in keys and isinstance(x, torch.Tensor):
                    s = x.detach().float().pow(2).reshape(-1, x.shape[-1]).sum(0)
                    acc[(name, feat)] = acc.get((name, feat), 0) + s

        return hook

    try:
        for name in sorted({k[0] for k in keys}):
            with deferred_interrupts():  # a hook is never registered without being kept for removal
                hooks.append(model.get_submodule(name).register_forward_hook(make(name)))
        with torch.no_grad():
            for b in _batches(calibration):
                model(**{k: v.to(_device(model)) for k, v in b.items() if k != "labels"})
    finally:
        with deferred_interrupts():
            for h in hooks:
                h.remove()
    missing = keys - set(acc)
    if missing:
        raise SelectionError(f"calibration forward never reached modules {sorted(missing)[:4]}")
    return acc


def _gradient_sq(model: torch.nn.Module, params: list[str], calibration) -> dict[str, torch.Tensor]:
    """Gradient of each named parameter summed over the calibration set; flags and ``.grad`` restored."""
    flags = {p: p.requires_grad for p in model.parameters()}
    old_grads = {p: p.grad for p in model.parameters()}
    wanted = {n: model.get_parameter(n) for n in params}
    grads: dict[str, torch.Tensor] = {}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        for p in wanted.values():
            p.requires_grad_(True)
        with torch.enable_grad():
            for b in _batches(calibration):
                b = {k: v.to(_device(model)) for k, v in b.items()}
                b.setdefault("labels", b["input_ids"])
                out = model(**b)
                loss = getattr(out, "loss", None)
                if loss is None:  # models without a head-specific loss: a generic output-energy proxy
                    loss = (out.logits if hasattr(out, "logits") else out[0]).float().pow(2).mean()
                loss.backward()
        for n, p in wanted.items():
            grads[n] = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
    finally:
        with deferred_interrupts():
            for p, f in flags.items():
                p.grad = old_grads[p]
                p.requires_grad_(f)
    return grads


def _scores(model, work: list[tuple[Coupling, str]], strategy: str, calibration) -> dict:
    """Score of each index of each (coupling, role) in ``work``; higher = larger magnitude."""
    out: dict[tuple[str, str], torch.Tensor] = {}
    need_w = strategy in ("weight", "weight_activation")
    need_a = strategy in ("activation", "weight_activation")
    acts = grads = None
    with eval_mode(model):
        if need_a:
            keys = {(m.module, m.feature) for c, r in work for m in role_members(c, r)}
            experts = sorted(k[0] for k in keys if split_expert_name(k[0]) is not None)
            if experts:
                raise SelectionError(
                    f"strategy {strategy!r} reads activations at module boundaries, but MoE expert weights "
                    f"({experts[0]}, ...) run inside one experts module; use 'weight', 'gradient' or 'random'"
                )
            acts = _activation_sq(model, keys, calibration)
        if strategy == "gradient":
            grads = _gradient_sq(model, sorted({m.param for c, r in work for m in c.by_role(r)}), calibration)
    for c, role in work:
        n = role_level_size(c, role)
        w = torch.zeros(n)
        a = torch.zeros(n)
        g = torch.zeros(n)
        for m in c.by_role(role):
            if need_w:
                w += _slice_sq(model.get_parameter(m.param), m)
            if grads is not None:
                g += _slice_sq(grads[m.param], m)
        if need_a:
            for m in role_members(c, role):
                a += _gather_units(acts[(m.module, m.feature)], m)
        if strategy == "weight":
            out[(c.name, role)] = w.sqrt()
        elif strategy == "activation":
            out[(c.name, role)] = a.sqrt()
        elif strategy == "weight_activation":
            out[(c.name, role)] = w.sqrt() * a.sqrt()
        else:
            out[(c.name, role)] = g.sqrt()
    return out


def select(
    model: torch.nn.Module,
    structures: ModelStructures,
    config: SelectionConfig | None = None,
    *,
    calibration: Iterable[Any] | None = None,
    **settings: Any,
) -> Selection:
    """Pick the units to train: ``{coupling name: {role: sorted original indices}}``.

    The budgets and strategy come from ``config`` or from keyword settings (`SelectionConfig` fields; ratios
    not given are 0). Data-driven strategies score on ``calibration`` batches.
    """
    cfg = resolve(config, settings)
    if calibration is not None and not isinstance(calibration, (list, tuple)):
        calibration = list(calibration)
    if cfg.needs_data and not calibration:
        raise SelectionError(
            f"strategy {cfg.strategy!r} needs calibration batches (calibration=[{{'input_ids': ...}}, ...] or a "
            "list of token-id tensors); use 'random' or 'weight' without data"
        )
    ratios, strategy, variant, allocation, seed = cfg.role_ratios(), cfg.strategy, cfg.variant, cfg.allocation, cfg.seed
    gen = torch.Generator().manual_seed(int(seed))
    plan_work: list[tuple[Coupling, str, int]] = []
    for role, ratio in ratios.items():
        if float(ratio) == 0.0:
            continue
        cs = [c for c in structures.couplings if role_members(c, role)]
        if not cs:
            reasons = structures.frozen_reasons(role)
            why = f": {'; '.join(reasons[:3])}" if reasons else ""
            raise SelectionError(
                f"{RATIO_KEYS[role]}={ratio} but the model has no sliceable {role!r} members "
                f"(model_type {structures.model_type!r}){why}; set it to 0"
            )
        sizes = [role_level_size(c, role) for c in cs]
        counts = _allocate(sizes, float(ratio), allocation, gen)
        if sum(counts) >= sum(sizes):
            raise SelectionError(
                f"{RATIO_KEYS[role]}={ratio} selects every {role!r} unit of the model "
                f"({sum(sizes)} in total); "
                "that is full fine-tuning of those weights — use a smaller ratio"
            )
        plan_work += [(c, role, k) for c, k in zip(cs, counts) if k > 0]
    scores = _scores(model, [(c, r) for c, r, _ in plan_work], strategy, calibration) if strategy != "random" else {}
    result: Selection = {}
    for c, role, k in plan_work:
        n = role_level_size(c, role)
        if strategy == "random":
            chosen = torch.randperm(n, generator=gen)[:k]
        else:
            s = scores[(c.name, role)]
            chosen = torch.argsort(-s if variant == "large" else s, stable=True)[:k]
        result.setdefault(c.name, {})[role] = sorted(int(i) for i in chosen)
    return result

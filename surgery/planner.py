"""Build an `S2Plan` (selection → legal permutations → block slices) and apply it verified, all-or-nothing.

The plan stores the couplings it permutes (``settings["couplings"]``) so a saved plan can be applied
to a fresh copy of the same model without re-analysing it, and checked: its slices must follow from its
permutations and selection. A model records the plan applied to it in its one surgery record
(`surgery.transaction.record_of`), so surgery is never done twice, and `unapply_plan` undoes it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable
from typing import Any

import torch

from surgery.analyze import analyze
from surgery.config import SelectionConfig, resolve
from surgery.linear import linear_shape, resolve_linear
from surgery.permute import (
    IllegalPermutation,
    apply_permutations,
    check_permutation,
    front_permutation,
    group_permutation,
    inverse,
    runs_of,
)
from surgery.plan import BlockSlice, PlanError, S2Plan, model_fingerprint
from surgery.select import role_members, select
from surgery.structures import Coupling, Member, ModelStructures
from surgery.transaction import RECORD_ATTR, check_intact, record_of, transaction
from surgery.verify import verify_function

APPLIED_ATTR = RECORD_ATTR  # the model attribute holding its surgery record (and so the applied plan)


def plan_id(plan: S2Plan) -> str:
    """Content hash of a plan (certificate excluded), used to recognise an already-applied plan."""
    d = plan.to_dict()
    d.pop("certificate", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def applied_plan(model: torch.nn.Module) -> S2Plan | None:
    """The plan ``model`` is permuted by (with its certificate), or None for an untouched model."""
    rec = record_of(model)
    return None if rec is None else rec.plan


def applied_plan_id(model: torch.nn.Module) -> str | None:
    """Id of the plan already applied to ``model`` (None for an untouched model)."""
    plan = applied_plan(model)
    return None if plan is None else plan_id(plan)


def _structures(model: torch.nn.Module, structures: ModelStructures | None) -> ModelStructures:
    if structures is not None:
        return structures
    return analyze(model)  # joins the transaction running on the model, if any


def _member_slice(m: Member, perm: list[int], gperm: list[int], units: list[int]) -> tuple[list, list]:
    """Feature positions (after permutation) and their original feature indices for selected ``units``."""
    p = gperm if m.level == "group" else perm
    inv = inverse(p)
    pos_to_orig: dict[int, int] = {}
    for old in units:
        new = inv[old]
        for a, b in zip(m.element_indices(new), m.element_indices(old)):
            pos_to_orig[a - m.module_offset] = b - m.module_offset  # in the module's own feature space
    runs = runs_of(pos_to_orig)
    original = [pos_to_orig[i] for s, e in runs for i in range(s, e)]
    return runs, original


def _slices(coupling: Coupling, perm: list[int], chosen: dict[str, list[int]]) -> list[BlockSlice]:
    gperm = group_permutation(coupling, perm)
    out: list[BlockSlice] = []
    seen: set[tuple] = set()
    for role, units in chosen.items():
        for m in role_members(coupling, role):
            key = (m.module, m.feature, m.offset, m.step, m.unit, m.level)
            if key in seen:  # weight and bias of one module describe the same features
                continue
            seen.add(key)
            runs, original = _member_slice(m, perm, gperm, units)
            out.append(BlockSlice(module=m.module, role=role, feature=m.feature, runs=runs, original=original))
    return out


def make_plan(
    model: torch.nn.Module,
    structures: ModelStructures | None = None,
    config: SelectionConfig | None = None,
    *,
    calibration: Iterable[Any] | None = None,
    **settings: Any,
) -> S2Plan:
    """Select units, derive legal front-loading permutations and the block slices they produce.

    What trains comes from ``config`` or keyword settings (`SelectionConfig` fields; ratios not given are 0).
    Slices live in each module's feature space after permutation: o/down train "in" columns, v/up train "out"
    rows; fused members include their offset; ``original`` maps back to the stock model.
    """
    cfg = resolve(config, settings)
    check_intact(model)
    if applied_plan_id(model) is not None:
        raise PlanError(
            f"model already carries applied plan {applied_plan_id(model)}; make plans on an unpermuted model"
        )
    structures = _structures(model, structures)
    selection = select(model, structures, cfg, calibration=calibration)
    permutations: dict[str, list[int]] = {}
    slices: list[BlockSlice] = []
    couplings = []
    for c in structures.couplings:
        chosen = selection.get(c.name)
        if not chosen:
            continue
        # Fixed role order so "A-only, both, B-only" is stable: o before v, down before up.
        ordered = {r: chosen[r] for r in ("o", "v", "down", "up") if r in chosen}
        perm = front_permutation(c, ordered)
        permutations[c.name] = perm
        slices += _slices(c, perm, ordered)
        couplings.append(c.to_dict())
    settings = {
        **{k: float(v) for k, v in cfg.ratios().items()},
        "strategy": cfg.strategy,
        "variant": cfg.variant,
        "allocation": cfg.allocation,
        "seed": int(cfg.seed),
        "tied": [list(t) for t in structures.tied],
        "couplings": couplings,
    }
    settings = json.loads(json.dumps(settings))  # JSON-normal form (tuples -> lists) so save/load is exact
    plan = S2Plan(
        fingerprint=model_fingerprint(model),
        model_type=structures.model_type,
        permutations=permutations,
        selected=selection,
        slices=slices,
        settings=settings,
    )
    plan.validate()
    return plan


def check_plan_consistency(plan: S2Plan) -> None:
    """Refuse a plan whose slices do not follow from its stored couplings, permutations and selection.

    Catches a plan file edited by hand (runs shifted, ``original`` reordered, units changed): such a plan
    would train the wrong rows/columns and extract adapters at the wrong indices. Plans without stored
    couplings (made from bare slices) are not checked.
    """
    stored = plan.settings.get("couplings")
    if stored is None:
        return
    try:
        couplings = [Coupling.from_dict(d) for d in stored]
    except (KeyError, TypeError, ValueError) as e:
        raise PlanError(f"plan's stored couplings are malformed: {type(e).__name__}: {e}") from e
    expected: list[BlockSlice] = []
    for c in couplings:
        if c.name not in plan.permutations or c.name not in plan.selected:
            raise PlanError(f"plan stores coupling {c.name!r} but has no permutation or selection for it")
        perm, chosen = plan.permutations[c.name], plan.selected[c.name]
        if sorted(perm) != list(range(c.size)):
            raise PlanError(f"plan permutation for {c.name!r} is not a permutation of the coupling's {c.size} units")
        try:
            ordered = {r: chosen[r] for r in ("o", "v", "down", "up") if r in chosen}
            expected += _slices(c, perm, ordered)
        except (KeyError, IndexError, ValueError) as e:
            raise PlanError(f"plan selection for {c.name!r} does not fit the coupling: {type(e).__name__}: {e}") from e
    if expected != plan.slices:
        bad = next(
            (f"{s.module} ({s.role})" for s, t in zip(plan.slices, expected) if s != t),
            f"{len(plan.slices)} slices listed, {len(expected)} expected",
        )
        raise PlanError(
            f"the plan's slices do not follow from its permutations and selection (first mismatch: {bad}); "
            "was the plan file edited? Re-create it with make_plan or restore the saved copy"
        )


def _plan_couplings(model, plan: S2Plan, structures: ModelStructures | None) -> list[tuple[Coupling, list[int]]]:
    stored = plan.settings.get("couplings")
    if stored is not None:
        try:
            kept = ModelStructures(
                plan.model_type, 0, [Coupling.from_dict(d) for d in stored], plan.settings.get("tied", [])
            )
        except (KeyError, TypeError, ValueError) as e:
            raise PlanError(f"plan's stored couplings are malformed: {type(e).__name__}: {e}") from e
        if structures is None:
            structures = kept
        else:
            known = {c.name for c in structures.couplings}
            for c in kept.couplings:
                if c.name in known and structures[c.name] != c:
                    raise PlanError(
                        f"coupling {c.name!r} stored in the plan differs from the structures given: the plan "
                        "was made from another analysis of this model. Re-create the plan."
                    )
    elif structures is None:
        structures = _structures(model, None)
    items = []
    for name, perm in plan.permutations.items():
        try:
            c = structures[name]
        except KeyError as e:
            raise PlanError(f"plan permutes coupling {name!r}, which this model's structures do not have") from e
        if len(perm) != c.size:
            raise PlanError(f"plan permutation for {name!r} has {len(perm)} entries; the coupling has {c.size}")
        items.append((c, perm))
    return items


def slice_weight_count(model: torch.nn.Module, slices: Iterable[BlockSlice]) -> int:
    """Weights the block slices train: features x the other fan of each Linear / Conv1D (no install needed)."""
    total = 0
    for s in slices:
        fan_in, fan_out, _ = linear_shape(resolve_linear(model, s.module))
        total += s.numel_features * (fan_out if s.feature == "in" else fan_in)
    return total


def apply_plan(
    model: torch.nn.Module,
    plan: S2Plan,
    structures: ModelStructures | None = None,
    *,
    verify: bool = True,
    n_inputs: int = 2,
    seq_len: int = 16,
) -> S2Plan:
    """Permute ``model`` by ``plan`` (all couplings or none), verify the function, return plan + certificate.

    Refuses a plan made for another model (fingerprint) and a model that already had a plan applied. On an
    illegal permutation, a failed verification or any interrupt the model is restored bit-exactly (each move is
    undone by its inverse; no copy of the weights is kept).
    """
    check_intact(model)
    plan.validate()
    done = applied_plan_id(model)
    if done is not None:
        raise PlanError(
            f"this model was already permuted by plan {done}; applying plan {plan_id(plan)} again would "
            "permute twice. Load a fresh copy of the base model instead."
        )
    plan.check_model(model)
    items = _plan_couplings(model, plan, structures)
    for c, perm in items:  # every legality check before anything is touched
        check_permutation(c, perm)
    check_plan_consistency(plan)  # the slices must follow from the (legal) permutations
    with transaction(model, "applying an S2 plan"):
        certificate = None
        if verify:
            moved = [c for c, _ in items]
            cert = verify_function(
                model,
                lambda: apply_permutations(model, items),
                n_inputs=n_inputs,
                seq_len=seq_len,
                journaled=True,
                moved=moved,
            )
            certificate = cert.to_dict()
        else:
            apply_permutations(model, items)
        result = dataclasses.replace(plan, certificate=certificate)
        record_of(model).plan = result  # a plain attribute: not a submodule, not in the state dict
    return result


def unapply_plan(model: torch.nn.Module, *, verify: bool = True) -> S2Plan:
    """Undo the permutations of the plan applied to ``model`` (in place) and clear it from the model's record.

    With ``verify`` the function is checked unchanged (and the model restored on failure). Layers installed
    on top (``s2ft_lightning.layers``) must be removed first: the inverse permutation is of plain modules.
    """
    check_intact(model)
    plan = applied_plan(model)
    if plan is None:
        raise PlanError("this model carries no applied S2 plan; there is nothing to undo")
    items = [(c, inverse(perm)) for c, perm in _plan_couplings(model, plan, None)]
    with transaction(model, "undoing an S2 plan"):
        if verify:
            verify_function(
                model, lambda: apply_permutations(model, items), journaled=True, moved=[c for c, _ in items]
            )
        else:
            apply_permutations(model, items)
        record_of(model).plan = None
    return plan


__all__ = [
    "APPLIED_ATTR",
    "IllegalPermutation",
    "applied_plan",
    "applied_plan_id",
    "apply_plan",
    "check_plan_consistency",
    "make_plan",
    "plan_id",
    "unapply_plan",
]

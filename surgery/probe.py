"""Prove an analysis: move every coupling by a legal, non-identity permutation and check the function holds.

A plan only moves the heads and channels it selects, so a wrong coupling could pass a plan's verification
when the selection happens not to move it, and corrupt the model when verification is off. The probe rotates
every unit of every coupling (kv groups by one group and q heads inside each group by one under GQA; every
other unit set by one position), compares the logits on seeded inputs, and undoes the rotation exactly (a
permutation is a pure data move, so its inverse restores the bytes). On a mismatch each layer is probed alone
to name the couplings that are wrong.

Both checks of `surgery.verify` apply: the logits are computed in fp32 whatever the model's dtype (in bf16 a
k bias left behind by its heads passed), and every experts module is driven expert by expert with its own
tokens (`surgery.expert_check`), so a per-expert coupling is proved even for experts the router sends no
probe token to; a failing expert is named.

Experts couplings (router rows + whole experts) are not moved: plans never move experts (they train channels
inside experts), so nothing needs that proof, and moving experts would have to carry routing-correction
buffers and keep expert groups (docs/ARCHITECTURE.md, "MoE experts"). Every per-expert channel coupling is moved.
"""

from __future__ import annotations

import torch

from surgery.expert_check import compare_experts, expert_outputs, experts_to_drive
from surgery.permute import apply_permutations
from surgery.structures import Coupling, ModelStructures
from surgery.transaction import Transaction, transaction
from surgery.verify import compare_logits, eval_mode, forward_logits, make_inputs, tolerance_for


class ProbeError(ValueError):
    """A coupling whose permutation changes the model's function: the analysis of it is wrong."""


def probe_permutation(c: Coupling) -> list[int] | None:
    """A legal permutation of ``c`` that moves every unit it can (``perm[new] = old``); None for one unit."""
    n, r = c.size, c.group_size
    if n < 2:
        return None
    if r <= 1:
        return [(p + 1) % n for p in range(n)]
    groups = c.num_groups
    perm = []
    for g in range(groups):  # new group g holds old group g+1; inside it, slot j holds old slot j+1
        old_group = (g + 1) % groups
        perm += [old_group * r + (j + 1) % r for j in range(r)]
    return perm


def _moved_logits(model, items, inputs, txn: Transaction) -> torch.Tensor:
    """Logits with ``items`` applied; the moves are journaled and undone before this returns (or raises)."""
    point = txn.savepoint()
    try:
        apply_permutations(model, items)
        return forward_logits(model, inputs)
    finally:
        txn.rollback_to(point)


@torch.no_grad()
def probe_structures(model: torch.nn.Module, structures: ModelStructures, *, seed: int = 0) -> int:
    """Raise `ProbeError` naming every coupling whose rotation changes the function; return how many moved.

    The model is left bit-identical either way (an interrupt included: the moves are journaled in the model's
    transaction and undone), and in the training mode it had. ``structures.notes`` gets how many experts were
    driven one by one and which experts modules could not be (their couplings are then proved by the logits
    only, on the experts the router reaches).
    """
    movable = [c for c in structures.couplings if c.kind != "experts"]  # plans never move experts
    items = [(c, p) for c in movable if (p := probe_permutation(c)) is not None]
    if not items:
        return 0
    _, tol = tolerance_for(model)
    driven, not_driven = experts_to_drive(model, [c for c, _ in items])
    if driven:
        count = sum(d.num_experts for d in driven)
        structures.notes.append(f"probe: {count} experts in {len(driven)} modules driven one by one")
    structures.notes += [f"probe: experts not driven one by one (proved by the logits only): {n}" for n in not_driven]
    inputs = make_inputs(model, 2, 16, seed)
    with transaction(model, "the analysis probe") as txn, eval_mode(model):
        before = forward_logits(model, inputs)
        experts_before = [expert_outputs(model, d, seed=seed) for d in driven]
        point = txn.savepoint()
        try:
            apply_permutations(model, items)
            cmp = compare_logits(before, forward_logits(model, inputs), tol)
            experts = compare_experts(
                driven, experts_before, [expert_outputs(model, d, seed=seed) for d in driven], tol
            )
        finally:
            txn.rollback_to(point)
        if cmp.passed and experts.passed:
            return len(items)
        bad = list(experts.detail)  # each expert's own output names it; its coupling needs no logits probe
        by_experts = {d.path for d in driven}
        for layer in sorted({c.layer for c, _ in items}) if not cmp.passed else ():
            for c, p in [(c, p) for c, p in items if c.layer == layer]:
                if c.parent is not None and c.name.rpartition(".")[0] in by_experts:
                    continue
                cmp = compare_logits(before, _moved_logits(model, [(c, p)], inputs, txn), tol)
                if not cmp.passed:
                    params = sorted({m.param for m in c.members})[:4]
                    bad.append(
                        f"layer {layer} {c.kind} coupling {c.name!r} ({params}...; |Δlogits| {cmp.rel_diff:.2e} of "
                        "scale)"
                    )
    more = f"; ... {len(bad) - 8} more" if len(bad) > 8 else ""
    detail = "; ".join(bad[:8]) + more if bad else "no single coupling fails alone; several interact"
    raise ProbeError(
        f"the structure analysis of {structures.model_type} is wrong: moving every coupling by a legal "
        f"permutation changed the function. {detail}. This layout is not supported; nothing was changed"
    )

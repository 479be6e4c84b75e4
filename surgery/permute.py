"""Apply permutations of a coupling's unit indices to every member, legally and all-or-nothing.

Convention (as in `surgery.plan`): new position ``p`` holds old index ``perm[p]``. Legality is checked
before any tensor is touched. Each member's move is journaled with its exact inverse (a pure data move, so
undoing it restores the bytes without a copy of the weights) in the model's transaction (`surgery.transaction`):
any failure or interrupt moves every moved member back.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence

import torch

from surgery.structures import Coupling, Member
from surgery.transaction import Transaction, transaction


class IllegalPermutation(ValueError):
    """A permutation that would change the model's function (or is not a permutation at all)."""


def _where(coupling: Coupling) -> str:
    return f"coupling {coupling.name!r} (layer {coupling.layer}, {coupling.kind})"


def _roles(members: Iterable[Member]) -> str:
    return ", ".join(sorted({f"{m.role or '?'}:{m.param}" for m in members}))


def runs_of(positions: Iterable[int]) -> list[tuple[int, int]]:
    """Half-open ``[start, end)`` runs covering the sorted, de-duplicated ``positions``."""
    runs: list[tuple[int, int]] = []
    for p in sorted(set(int(x) for x in positions)):
        if runs and runs[-1][1] == p:
            runs[-1] = (runs[-1][0], p + 1)
        else:
            runs.append((p, p + 1))
    return runs


def inverse(perm: Sequence[int]) -> list[int]:
    """``inv[old] = new`` for a permutation ``perm[new] = old``."""
    inv = [0] * len(perm)
    for new, old in enumerate(perm):
        inv[old] = new
    return inv


def group_permutation(coupling: Coupling, perm: Sequence[int]) -> list[int]:
    """The kv-group permutation induced by a legal head permutation (identity map when no GQA)."""
    r = coupling.group_size
    return [perm[g * r] // r for g in range(coupling.num_groups)]


def check_permutation(coupling: Coupling, perm: Sequence[int]) -> list[int]:
    """Validate ``perm`` for ``coupling`` (range, GQA grouping); return it as a list of ints."""
    try:
        perm = [int(i) for i in perm]
    except (TypeError, ValueError) as e:
        raise IllegalPermutation(f"{_where(coupling)}: permutation must be a sequence of ints ({e})") from e
    if sorted(perm) != list(range(coupling.size)):
        raise IllegalPermutation(
            f"{_where(coupling)}: {perm[:16]}{'...' if len(perm) > 16 else ''} is not a permutation of "
            f"range({coupling.size}); every index must appear exactly once"
        )
    r = coupling.group_size
    if r > 1:
        for g in range(coupling.num_groups):
            block = perm[g * r : (g + 1) * r]
            olds = {i // r for i in block}
            if len(olds) != 1:
                grouped = [m for m in coupling.members if m.level == "group"]
                raise IllegalPermutation(
                    f"{_where(coupling)}: new kv group {g} would receive heads {block} from kv groups "
                    f"{sorted(olds)}; under GQA (group_size {r}) heads move only inside their kv group and "
                    f"kv groups move as units (group-level members: {_roles(grouped) or 'none'})"
                )
    return perm


def _check_members(coupling: Coupling, members: Sequence[Member] | None) -> None:
    if members is None:
        return
    given, full = set(members), set(coupling.members)
    if given != full:
        missing = full - given
        raise IllegalPermutation(
            f"{_where(coupling)}: permuting only some members breaks the function; missing "
            f"{_roles(missing) or 'none'}"
            + (f", unknown {_roles(given - full)}" if given - full else "")
            + ". All members of a coupling must move together: pass members=None."
        )


def _param(model: torch.nn.Module, name: str) -> torch.nn.Parameter | torch.Tensor:
    try:
        return model.get_parameter(name)
    except AttributeError as e:
        raise IllegalPermutation(f"member parameter {name!r} does not exist in the model ({e})") from e


def storage_key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))


def pinned_view(t: torch.Tensor, m: Member) -> tuple[torch.Tensor, int]:
    """View of ``t`` with ``m.fixed`` dims selected, and ``m.axis`` expressed in that view."""
    axis = m.axis if m.axis >= 0 else m.axis + t.dim()
    for dim, index in sorted(m.fixed, reverse=True):
        t = t.select(dim, index)
        if dim < axis:
            axis -= 1
    return t, axis


def _check_shape(coupling: Coupling, m: Member, t: torch.Tensor, count: int) -> None:
    view, axis = pinned_view(t, m)
    if m.count != count:
        raise IllegalPermutation(
            f"{_where(coupling)}: member {m.role}:{m.param} has {m.count} indices at level {m.level!r}, "
            f"expected {count}"
        )
    if not 0 <= axis < view.dim() or m.offset + m.extent > view.shape[axis]:
        raise IllegalPermutation(
            f"{_where(coupling)}: member {m.role}:{m.param} (axis {m.axis}, offset {m.offset}, extent "
            f"{m.extent}) does not fit the parameter of shape {tuple(t.shape)}"
        )


def member_index(m: Member, units: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Element positions along ``m.axis`` of each index in ``units``: shape (len(units), m.unit)."""
    units = torch.as_tensor(units, dtype=torch.long).reshape(-1, 1)
    return m.offset + units * m.step + torch.arange(m.unit)


def _element_map(m: Member, size: int, src: torch.Tensor) -> torch.Tensor:
    """Index vector along the member axis: new element ``e`` takes old element ``idx[e]``.

    ``src[i]`` holds the old element positions that new index ``i`` receives.
    """
    idx = torch.arange(size)
    idx[member_index(m, range(m.count)).reshape(-1)] = src.reshape(-1)
    return idx


def _apply_member(t: torch.Tensor, m: Member, idx: torch.Tensor) -> None:
    view, axis = pinned_view(t, m)
    with torch.no_grad():
        view.copy_(view.index_select(axis, idx.to(view.device)))


def _unit_src(coupling: Coupling, m: Member, perm: Sequence[int], gperm: Sequence[int]) -> torch.Tensor:
    return member_index(m, gperm if m.level == "group" else perm)


def apply_permutations(model: torch.nn.Module, items: Sequence[tuple[Coupling, Sequence[int]]]) -> None:
    """Permute several couplings all-or-nothing: check every one, then move each member, journaled.

    Inside a running transaction (`surgery.transaction`) the moves join its journal, so they are undone with
    the rest of it; on their own they are undone if any move fails.
    """
    plans = []
    for coupling, perm in items:
        perm = check_permutation(coupling, perm)
        gperm = group_permutation(coupling, perm)
        for m in coupling.members:
            t = _param(model, m.param)
            _check_shape(coupling, m, t, coupling.num_groups if m.level == "group" else coupling.size)
        plans.append((coupling, perm, gperm))
    with transaction(model, "permuting couplings") as txn:
        _move(model, plans, _unit_src, txn)


def _move(model, plans, src_fn, txn: Transaction) -> None:
    """Move every member of ``plans``; each move is journaled with its inverse index map."""
    done: set[tuple] = set()
    for coupling, perm, gperm in plans:
        for m in coupling.members:
            t = _param(model, m.param)
            view, axis = pinned_view(t, m)
            # Tied parameters share storage: the same index map on the same storage runs once.
            key = (storage_key(t), m.axis, m.fixed, m.offset, m.step, m.unit, m.count, coupling.name)
            if key in done:
                continue
            done.add(key)
            idx = _element_map(m, view.shape[axis], src_fn(coupling, m, perm, gperm))
            with txn.step(functools.partial(_apply_member, t, m, torch.argsort(idx)), f"the move of {m.param}"):
                _apply_member(t, m, idx)


def permute_coupling(
    model: torch.nn.Module,
    coupling: Coupling,
    perm: Sequence[int],
    *,
    members: Sequence[Member] | None = None,
) -> None:
    """Apply ``perm`` (new position p holds old unit index perm[p]) to every member of ``coupling``.

    ``members`` exists only to be refused when it is a strict subset: a coupling moves as a whole. Tied
    parameters are recognised by shared storage and permuted once.
    """
    _check_members(coupling, members)
    apply_permutations(model, [(coupling, perm)])


def _split_elements(coupling: Coupling, elem_perm: Sequence[int]) -> tuple[list[int], list[list[int]]]:
    """Decompose an element permutation into a unit permutation and per-new-unit inner permutations."""
    u = coupling.head_dim if coupling.kind == "heads" and coupling.head_dim else 1
    n = coupling.size * u
    try:
        elem_perm = [int(i) for i in elem_perm]
    except (TypeError, ValueError) as e:
        raise IllegalPermutation(f"{_where(coupling)}: element permutation must be ints ({e})") from e
    if sorted(elem_perm) != list(range(n)):
        raise IllegalPermutation(f"{_where(coupling)}: element permutation is not a permutation of range({n})")
    perm, inner = [], []
    for new in range(coupling.size):
        block = elem_perm[new * u : (new + 1) * u]
        olds = {e // u for e in block}
        if len(olds) != 1:
            raise IllegalPermutation(
                f"{_where(coupling)}: new unit {new} would mix elements of units {sorted(olds)}; element "
                f"permutations may only move whole units of {u} elements and reorder inside one unit"
            )
        perm.append(olds.pop())
        inner.append([e % u for e in block])
    return perm, inner


def permute_elements(
    model: torch.nn.Module,
    coupling: Coupling,
    elem_perm: Sequence[int],
) -> None:
    """Lower-level API: permute the ``size * head_dim`` elements of a coupling (head dims included).

    Refused under RoPE unless it moves whole heads; under GQA the inner order must agree within a kv
    group; members whose unit is not the element block size only allow whole-unit moves.
    """
    perm, inner = _split_elements(coupling, elem_perm)
    u = len(inner[0]) if inner else 1
    moved_inside = [h for h, s in enumerate(inner) if s != list(range(u))]
    if not moved_inside:
        return permute_coupling(model, coupling, perm)
    if coupling.rope:
        raise IllegalPermutation(
            f"{_where(coupling)}: element permutation reorders dimensions inside heads {moved_inside[:8]}; "
            f"RoPE rotates pairs of positions inside a head ({_roles(coupling.members)}), so only whole "
            "heads may move"
        )
    perm = check_permutation(coupling, perm)
    r = coupling.group_size
    for g in range(coupling.num_groups):
        if any(inner[g * r + j] != inner[g * r] for j in range(r)):
            raise IllegalPermutation(
                f"{_where(coupling)}: heads of new kv group {g} reorder their dimensions differently; the "
                "shared k/v head of a GQA group forces one inner order per group"
            )
    odd = [m for m in coupling.members if m.unit != u]
    if odd:
        raise IllegalPermutation(
            f"{_where(coupling)}: members {_roles(odd)} have a unit other than {u}, so only whole units may move"
        )
    gperm = group_permutation(coupling, perm)
    for m in coupling.members:
        t = _param(model, m.param)
        _check_shape(coupling, m, t, coupling.num_groups if m.level == "group" else coupling.size)

    def src(c: Coupling, m: Member, perm: Sequence[int], gperm: Sequence[int]) -> torch.Tensor:
        group = m.level == "group"
        olds = gperm if group else perm
        sigma = torch.tensor([inner[new * r] if group else inner[new] for new in range(m.count)])
        return m.offset + torch.as_tensor(olds).reshape(-1, 1) * m.step + sigma

    with transaction(model, "permuting elements") as txn:
        _move(model, [(coupling, perm, gperm)], src, txn)


def front_permutation(coupling: Coupling, selected_by_role: Mapping[str, Sequence[int]]) -> list[int]:
    """A legal permutation that brings the selected units together, at the front where possible.

    Indices of a role are at that role's member level (heads, or kv groups for group-level roles
    under GQA). With one role and no GQA the selection is exactly the prefix; with two roles A, B
    the order is [A-only, both, B-only, rest], which keeps each role contiguous. Under GQA, kv groups
    follow that order and, inside each group, selected heads come first (so o may form several runs).
    """
    r = coupling.group_size
    levels = {}
    for role in selected_by_role:
        ms = coupling.by_role(role)
        if not ms:
            raise IllegalPermutation(f"{_where(coupling)} has no members with role {role!r}")
        levels[role] = "group" if r > 1 and any(m.level == "group" for m in ms) else "unit"
    roles = list(selected_by_role)
    unit_sel: dict[str, set[int]] = {}
    group_sel: dict[str, set[int]] = {}
    for role, idx in selected_by_role.items():
        bound = coupling.num_groups if levels[role] == "group" else coupling.size
        bad = [i for i in idx if not 0 <= int(i) < bound]
        if bad:
            raise IllegalPermutation(
                f"{_where(coupling)}: selected {role!r} indices {bad[:8]} are out of range({bound})"
            )
        target = group_sel if levels[role] == "group" else unit_sel
        target[role] = {int(i) for i in idx}

    def tier(mask: tuple[bool, ...]) -> tuple:
        # [A-only, both, B-only, rest] for two roles; lexicographic fallback for more.
        if len(mask) == 2:
            return ({(True, False): 0, (True, True): 1, (False, True): 2}.get(mask, 3),)
        return (not any(mask), tuple(not b for b in mask))

    def group_mask(g: int) -> tuple[bool, ...]:
        heads = range(g * r, (g + 1) * r)
        return tuple((g in group_sel[ro]) if ro in group_sel else any(h in unit_sel[ro] for h in heads) for ro in roles)

    def head_mask(h: int) -> tuple[bool, ...]:
        return tuple(h in unit_sel.get(ro, set()) for ro in roles if ro in unit_sel)

    groups = sorted(range(coupling.num_groups), key=lambda g: (tier(group_mask(g)), g))
    perm: list[int] = []
    for g in groups:
        heads = range(g * r, (g + 1) * r)
        perm.extend(sorted(heads, key=lambda h: (not any(head_mask(h)), h)))
    return check_permutation(coupling, perm)

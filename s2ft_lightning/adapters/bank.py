"""Merge, unmerge and switch S²FT adapters on a stock model, bit-exactly (`AdapterBank`).

`AdapterBank` saves, at registration, the base values of every row/column an adapter touches. Each merged
position is always recomputed as ``cast(base_fp32 + Σ scale·delta)`` from those saved values (one cast, no
drift), and a position no merged adapter touches gets ``cast(base_fp32) == base`` back, so unmerge restores
the base bit-identically however many merge/unmerge/switch cycles ran (PEFT subtracts deltas in bf16).

Switching to one adapter is the hot path: `add` precomputes, per adapter and module, the index tensors,
the base values and the merged values ``cast(base_fp32 + delta)`` in the weight dtype at its positions, so
a switch is only tensor copies (restore the old positions, write the new ones), no arithmetic or hashing.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from s2ft_lightning.adapters.format import Adapter, AdapterError, check_base, get_module, module_kind
from s2ft_lightning.blocks import accumulation_dtype, run_positions
from surgery.linear import logical_weight


def _check_scale(scale: float) -> float:
    """A finite float scale, or an AdapterError saying why not (nothing is written before this check)."""
    try:
        value = float(scale)
    except (TypeError, ValueError) as e:
        raise AdapterError(f"adapter scale {scale!r} is not a number") from e
    if not math.isfinite(value):
        raise AdapterError(f"adapter scale {scale!r} is not finite; use a finite number such as 1.0 or 0.5")
    return value


class _Saved:
    """Base values of the touched rows and columns of one module (logical ``(out, in)`` orientation).

    Rows are stored as ``(n, in)``, columns transposed as ``(n, out)``, each with an index -> position map.
    """

    def __init__(self, out_f: int, in_f: int, dtype: torch.dtype, device: torch.device) -> None:
        self.row_pos: dict[int, int] = {}
        self.col_pos: dict[int, int] = {}
        self.row_vals = torch.empty(0, in_f, dtype=dtype, device=device)
        self.col_vals = torch.empty(0, out_f, dtype=dtype, device=device)

    def rows_block(self, idx: list[int]) -> torch.Tensor:
        pos = torch.tensor([self.row_pos[i] for i in idx], device=self.row_vals.device)
        return self.row_vals.index_select(0, pos)

    def cols_block(self, idx: list[int]) -> torch.Tensor:
        pos = torch.tensor([self.col_pos[i] for i in idx], device=self.col_vals.device)
        return self.col_vals.index_select(0, pos).t()


@dataclass
class _Block:
    """A registered block on the model's device, with its index tensor and index -> position map."""

    feature: str
    indices: list[int]
    idx: torch.Tensor
    where: dict[int, int]
    delta: torch.Tensor


_MAX_RUNS = 4  # write an index set as slice copies when it has at most this many contiguous runs


@dataclass
class _Axis:
    """One adapter's sorted rows (``dim`` 0) or columns (``dim`` 1) of one module, ready to be written."""

    dim: int
    indices: list[int]
    idx: torch.Tensor
    runs: list[tuple[int, int, int]] | None  # slice copies instead of index_copy_ when few runs
    base: torch.Tensor  # base values there, weight dtype, (k, in) or (out, k)

    def write(self, w: torch.Tensor, vals: torch.Tensor) -> None:
        if self.runs is None:
            w.index_copy_(self.dim, self.idx, vals)
        else:
            for dst, src, n in self.runs:
                w.narrow(self.dim, dst, n).copy_(vals.narrow(self.dim, src, n))


@dataclass
class _Entry:
    """One adapter's positions in one module, with the module's weight dtype/device at `add` time."""

    module: str
    mod: torch.nn.Module
    conv: bool
    dtype: torch.dtype
    device: torch.device
    rows: _Axis | None
    cols: _Axis | None

    def weight(self) -> torch.Tensor | None:
        """The logical ``(out, in)`` weight, or None if its dtype/device changed since `add`."""
        w = self.mod.weight
        if w.dtype != self.dtype or w.device != self.device:
            return None
        return w.t() if self.conv else w


class AdapterBank:
    """Adapters registered against one stock model; merge / unmerge / switch them in place, exactly.

    The base values at every position a registered adapter touches are saved once, at `add`, together with
    the adapter's merged values in the weight dtype (about twice its size in that dtype), so a switch to one
    adapter is only copies. Deltas are read at `add`: re-add an adapter whose deltas changed.
    """

    def __init__(self, model: torch.nn.Module, verify: bool = True) -> None:
        self.model = model
        self.verify = verify
        self.adapters: dict[str, Adapter] = {}
        self.active: list[tuple[str, float]] = []
        self._saved: dict[str, _Saved] = {}
        self._blocks: dict[str, dict[tuple[str, str], _Block]] = {}  # adapter -> (module, feature) -> block
        self._entries: dict[str, list[_Entry]] = {}  # adapter -> its positions per module, ready to write
        # adapter -> scale -> per entry (row values, column values) of cast(base + scale·delta), weight dtype
        self._merged: dict[str, dict[float, list[tuple[torch.Tensor | None, torch.Tensor | None]]]] = {}

    # -------------------------------------------------------------------------------- registration
    def add(self, adapter: Adapter, name: str | None = None) -> str:
        """Register ``adapter`` (checked against the base values, not the merged ones); returns its name."""
        name = name or adapter.name or f"adapter{len(self.adapters)}"
        if name in self.adapters:
            raise AdapterError(f"an adapter named {name!r} is already registered; remove it or pick another name")
        adapter.validate()
        if self.verify:
            check_base(self.model, adapter, read=self._read_base)
        else:  # still refuse shapes that would index out of range
            for m in adapter.modules:
                if tuple(logical_weight(get_module(self.model, m)).shape) != tuple(adapter.module_shapes[m]):
                    raise AdapterError(f"module {m!r} has a different shape than the adapter expects")
        blocks = {}
        for b in adapter.blocks:
            dev = logical_weight(get_module(self.model, b.module)).device
            blocks[(b.module, b.feature)] = _Block(
                b.feature,
                list(b.indices),
                torch.tensor(b.indices, dtype=torch.long, device=dev),
                {i: j for j, i in enumerate(b.indices)},
                b.delta.to(dev),
            )
        for module, (rows, cols) in self._positions([adapter]).items():
            self._save(module, sorted(rows), sorted(cols))
        self.adapters[name] = adapter
        self._blocks[name] = blocks
        try:
            self._entries[name] = self._prepare(adapter)
            self._merged[name] = {}
            with contextlib.suppress(AdapterError):  # a scale-1 merge that overflows is refused at merge time
                self._merged[name][1.0] = self._composed_at(name, [(name, 1.0)])
        except BaseException:
            self.remove(name)
            raise
        return name

    def _prepare(self, adapter: Adapter) -> list[_Entry]:
        """Per touched module: sorted row/column index tensors, their runs and the base values there."""
        pos = self._positions([adapter])
        entries = []
        for module in sorted(pos):
            mod = get_module(self.model, module)
            w = logical_weight(mod)
            saved = self._saved[module]
            axes: list[_Axis | None] = []
            for dim, ids in ((0, sorted(pos[module][0])), (1, sorted(pos[module][1]))):
                if not ids:
                    axes.append(None)
                    continue
                base = saved.rows_block(ids) if dim == 0 else saved.cols_block(ids)
                runs = run_positions(ids)
                axes.append(
                    _Axis(
                        dim,
                        ids,
                        torch.tensor(ids, dtype=torch.long, device=w.device),
                        runs if len(runs) <= _MAX_RUNS else None,
                        base.to(w.dtype).contiguous(),
                    )
                )
            conv = module_kind(mod) == "conv1d"
            entries.append(_Entry(module, mod, conv, w.dtype, w.device, axes[0], axes[1]))
        return entries

    def _composed_at(
        self, name: str, active: Sequence[tuple[str, float]]
    ) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
        """``cast(base_fp32 + Σ scale·delta)`` of ``active`` at each of ``name``'s entries (rows, columns).

        Refuses a result that is not finite (a scale or a sum that overflows the weight dtype): nothing is
        written before this returns.
        """
        out = []
        for e in self._entries[name]:
            r = self._compose(e.module, "out", e.rows.indices, active).to(e.dtype) if e.rows else None
            c = self._compose(e.module, "in", e.cols.indices, active).to(e.dtype).contiguous() if e.cols else None
            for v in (r, c):
                if v is not None and not bool(torch.isfinite(v).all()):
                    merged = ", ".join(f"{n!r} at scale {s:g}" for n, s in active)
                    raise AdapterError(
                        f"merging {merged} gives weights of {e.module!r} that are not finite in {e.dtype} (the scaled "
                        "delta overflows it); nothing was written. Use a smaller scale"
                    )
            out.append((r, c))
        return out

    def remove(self, name: str) -> None:
        """Unregister ``name`` (unmerging it first); saved base values nobody else needs are dropped."""
        self._get(name)
        if any(n == name for n, _ in self.active):
            self.unmerge(name)
        del self.adapters[name], self._blocks[name]
        self._entries.pop(name, None)
        self._merged.pop(name, None)
        keep = self._positions(list(self.adapters.values()))
        for module in list(self._saved):
            rows, cols = keep.get(module, (set(), set()))
            saved = self._saved[module]
            if set(saved.row_pos) - rows or set(saved.col_pos) - cols:
                w = logical_weight(get_module(self.model, module))
                fresh = _Saved(w.shape[0], w.shape[1], saved.row_vals.dtype, saved.row_vals.device)
                r, c = sorted(rows & set(saved.row_pos)), sorted(cols & set(saved.col_pos))
                if r:
                    fresh.row_vals, fresh.row_pos = (
                        saved.rows_block(r).clone(),
                        {i: j for j, i in enumerate(r)},
                    )
                if c:
                    fresh.col_vals = saved.cols_block(c).t().contiguous()
                    fresh.col_pos = {i: j for j, i in enumerate(c)}
                if r or c:
                    self._saved[module] = fresh
                else:
                    del self._saved[module]

    def _get(self, name: str) -> Adapter:
        if name not in self.adapters:
            raise AdapterError(f"no adapter named {name!r} is registered (have {sorted(self.adapters)})")
        return self.adapters[name]

    # ------------------------------------------------------------------------------------ operations
    def merge(self, name: str, scale: float = 1.0) -> None:
        """Add adapter ``name`` (times ``scale``) on top of whatever is merged."""
        scale = _check_scale(scale)
        self._get(name)
        if any(n == name for n, _ in self.active):
            raise AdapterError(f"adapter {name!r} is already merged; unmerge it first")
        self._transition([*self.active, (name, scale)])

    def unmerge(self, name: str | None = None) -> None:
        """Remove adapter ``name`` (or every merged adapter): touched positions go back bit-exactly."""
        if name is not None and not any(n == name for n, _ in self.active):
            raise AdapterError(f"adapter {name!r} is not merged (merged: {[n for n, _ in self.active]})")
        self._transition([] if name is None else [(n, s) for n, s in self.active if n != name])

    def switch(self, name: str, scale: float = 1.0) -> None:
        """Replace everything merged by adapter ``name``, touching only the union of their rows/columns."""
        scale = _check_scale(scale)
        self._get(name)
        self._transition([(name, scale)])

    @property
    def merged(self) -> list[str]:
        return [n for n, _ in self.active]

    # ------------------------------------------------------------------------------------- internals
    def _transition(self, new: list[tuple[str, float]]) -> None:
        """The one write path: base back at the positions of the adapters merged now, then the composed values
        of ``new`` at each of its adapters' positions. Values are ``cast(base_fp32 + Σ scale·delta)`` from the
        saved base values (`_compose`); one adapter's are precomputed at `add`, so a switch is only copies."""
        for n, _ in [*self.active, *new]:
            self._check_weights(n)
        old = [n for n, _ in self.active]
        values = {n: self._values(n, new) for n, _ in new}
        with torch.no_grad():
            for n in old:
                for e in self._entries[n]:
                    w = e.weight()
                    if e.cols is not None:
                        e.cols.write(w, e.cols.base)
                    if e.rows is not None:
                        e.rows.write(w, e.rows.base)
            for n, _ in new:
                for e, (rv, cv) in zip(self._entries[n], values[n]):
                    w = e.weight()
                    if cv is not None:
                        e.cols.write(w, cv)
                    if rv is not None:
                        e.rows.write(w, rv)
        self.active = list(new)

    def _values(
        self, name: str, active: list[tuple[str, float]]
    ) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
        """Composed values of ``active`` at adapter ``name``'s positions (cached when ``name`` is alone)."""
        if len(active) > 1:
            return self._composed_at(name, active)
        scale = active[0][1]
        cache = self._merged[name]
        if scale not in cache:
            for s in [s for s in cache if s != 1.0]:  # keep scale 1 and the latest other scale
                del cache[s]
            cache[scale] = self._composed_at(name, active)
        return cache[scale]

    def _check_weights(self, name: str) -> None:
        """Re-prepare ``name``'s positions if the model was cast or moved since `add` (saved values follow)."""
        if all(e.weight() is not None for e in self._entries[name]):
            return
        for e in self._entries[name]:
            saved, dev = self._saved[e.module], e.mod.weight.device
            saved.row_vals, saved.col_vals = saved.row_vals.to(dev), saved.col_vals.to(dev)
        for blocks in self._blocks.values():
            for (module, _), b in blocks.items():
                dev = get_module(self.model, module).weight.device
                b.idx, b.delta = b.idx.to(dev), b.delta.to(dev)
        self._entries[name] = self._prepare(self.adapters[name])
        self._merged[name] = {}

    @staticmethod
    def _positions(adapters: Sequence[Adapter]) -> dict[str, tuple[set[int], set[int]]]:
        pos: dict[str, tuple[set[int], set[int]]] = {}
        for a in adapters:
            for b in a.blocks:
                rows, cols = pos.setdefault(b.module, (set(), set()))
                (rows if b.feature == "out" else cols).update(b.indices)
        return pos

    def _read_base(self, module: str, feature: str, idx: torch.Tensor) -> torch.Tensor:
        """Base values of rows/columns ``idx``: current weights with saved base values laid over them."""
        w = logical_weight(get_module(self.model, module))
        saved = self._saved.get(module)
        idx = idx.to(w.device)
        with torch.no_grad():
            if feature == "out":
                vals = w.index_select(0, idx).clone()
                if saved is not None:
                    hit = [(j, i) for j, i in enumerate(idx.tolist()) if i in saved.row_pos]
                    if hit:
                        vals[[j for j, _ in hit]] = saved.rows_block([i for _, i in hit])
                    if saved.col_pos:
                        cols = list(saved.col_pos)
                        vals[:, cols] = saved.cols_block(cols).index_select(0, idx)
            else:
                vals = w.index_select(1, idx).clone()
                if saved is not None:
                    hit = [(j, i) for j, i in enumerate(idx.tolist()) if i in saved.col_pos]
                    if hit:
                        vals[:, [j for j, _ in hit]] = saved.cols_block([i for _, i in hit])
                    if saved.row_pos:
                        rows = list(saved.row_pos)
                        vals[rows, :] = saved.rows_block(rows).index_select(1, idx)
        return vals

    def _save(self, module: str, rows: list[int], cols: list[int]) -> None:
        w = logical_weight(get_module(self.model, module))
        saved = self._saved.setdefault(module, _Saved(w.shape[0], w.shape[1], w.dtype, w.device))
        new_rows = [r for r in rows if r not in saved.row_pos]
        new_cols = [c for c in cols if c not in saved.col_pos]
        # read both before storing either, so each read sees only the previously saved overlay
        col_vals = self._read_base(module, "in", torch.tensor(new_cols, dtype=torch.long)) if new_cols else None
        row_vals = self._read_base(module, "out", torch.tensor(new_rows, dtype=torch.long)) if new_rows else None
        if col_vals is not None:
            n = len(saved.col_pos)
            saved.col_vals = torch.cat([saved.col_vals, col_vals.t()])
            saved.col_pos.update({c: n + j for j, c in enumerate(new_cols)})
        if row_vals is not None:
            n = len(saved.row_pos)
            saved.row_vals = torch.cat([saved.row_vals, row_vals])
            saved.row_pos.update({r: n + j for j, r in enumerate(new_rows)})

    def _compose(self, module: str, feature: str, idx: list[int], active: Sequence[tuple[str, float]]) -> torch.Tensor:
        """fp32 base + Σ scale·delta of ``active`` at rows (``"out"``) or columns (``"in"``) ``idx``, in order.

        Every element gets the same sequence of additions whether it is computed as part of a row or a
        column, so overlapping rows and columns always agree bit for bit.
        """
        saved = self._saved[module]
        is_rows = feature == "out"
        base = saved.rows_block(idx) if is_rows else saved.cols_block(idx)
        out = base.to(accumulation_dtype(base.dtype))  # cast once by the caller
        dev = out.device
        where = {i: j for j, i in enumerate(idx)}
        idx_t = None
        for name, scale in active:
            blocks = self._blocks[name]
            for feat in ("out", "in"):  # rows first, then columns, for every adapter
                b = blocks.get((module, feat))
                if b is None:
                    continue
                if feat == feature:  # same axis: add the matching rows/columns of the delta
                    pairs = [(where[i], j) for i, j in b.where.items() if i in where]
                    if not pairs:
                        continue
                    dst = torch.tensor([p for p, _ in pairs], device=dev)
                    src = torch.tensor([q for _, q in pairs], device=dev)
                    contrib = b.delta.index_select(0 if is_rows else 1, src)
                    contrib = contrib if scale == 1.0 else contrib * scale
                    out.index_add_(0 if is_rows else 1, dst, contrib)
                else:  # cross axis: rows of a column delta / columns of a row delta
                    if idx_t is None:
                        idx_t = torch.tensor(idx, dtype=torch.long, device=dev)
                    contrib = b.delta.index_select(0 if is_rows else 1, idx_t)
                    contrib = contrib if scale == 1.0 else contrib * scale
                    if is_rows:
                        out[:, b.idx] += contrib
                    else:
                        out[b.idx, :] += contrib
        return out


def merge_adapter(model: torch.nn.Module, adapter: Adapter, scale: float = 1.0, verify: bool = True) -> AdapterBank:
    """Merge one adapter into ``model`` (fp32 add, one cast); the returned bank can unmerge it exactly."""
    scale = _check_scale(scale)
    bank = AdapterBank(model, verify=verify)
    bank.merge(bank.add(adapter), scale)
    return bank

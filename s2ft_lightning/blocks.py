"""Block arithmetic, written once: runs of positions, gather / scatter-add / write along them, merge in fp32 and
cast once, and split a merged weight back into base + Δ.

A block is a set of rows (``feature="out"``) or columns (``"in"``) of a logical ``[out, in]`` weight, held as
half-open runs ``[(start, end), ...]`` (positions in the permuted model) or as an index list (original positions,
in adapters). Merging always computes ``cast(base_fp32 + Σ Δ)`` with one add per delta in fp32 (fp64 stays fp64)
and one cast, so a merged export, a state dict, an adapter merged into a stock base and the PEFT export agree to
the bit (docs/ARCHITECTURE.md, "Trained state"). Users: `ops` (the delta forward), `layers` and `experts`
(S2 layers, their state-dict forms), and the adapters (extract, bank, serving, LoRA export).

A frozen base may be stored quantized (`s2ft_lightning.quantize`); `dense` reads it as a plain tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from surgery.linear import logical
from surgery.permute import runs_of

# One block: (feature, runs) with feature "in" | "out" and runs ((start, end), ...), in the module's
# logical [out, in] orientation (Conv1D's transposed storage is handled by ``transposed``).
Spec = tuple[str, tuple[tuple[int, int], ...]]
Runs = Sequence[tuple[int, int]]

__all__ = [
    "Spec",
    "accumulation_dtype",
    "add_runs_",
    "block_shape",
    "dense",
    "feature_dim",
    "gather_runs",
    "is_quantized",
    "merge_values",
    "merged_weight",
    "read_block",
    "run_positions",
    "runs_of",
    "split_merged_",
    "write_runs_",
]


# ---- quantized storage -----------------------------------------------------------------------------------
def is_quantized(t: torch.Tensor) -> bool:
    """True for a torchao quantized weight (NF4 or int8 weight-only)."""
    if type(t) in (torch.Tensor, torch.nn.Parameter):  # the common case, and one torch.compile can trace
        return False
    return type(t).__module__.startswith("torchao")


def dense(weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight as a plain tensor: dequantized when quantized (in its original dtype unless ``dtype``)."""
    if is_quantized(weight):
        if hasattr(weight, "get_original_weight"):  # NF4Tensor
            weight = weight.get_original_weight()
        else:
            weight = weight.dequantize()
    return weight if dtype is None else weight.to(dtype)


# ---- positions -------------------------------------------------------------------------------------------
def feature_dim(feature: str) -> int:
    """The dim of a logical ``[out, in]`` weight a block of ``feature`` spans: rows (0) or columns (1)."""
    return 0 if feature == "out" else 1


def block_shape(feature: str, runs: Runs, out_f: int, in_f: int) -> tuple[int, int]:
    """Shape of the delta of a block: ``(k, in)`` rows or ``(out, k)`` columns."""
    k = sum(e - s for s, e in runs)
    return (k, in_f) if feature == "out" else (out_f, k)


def run_positions(indices: Sequence[int]) -> list[tuple[int, int, int]]:
    """Contiguous runs of sorted ``indices`` as ``(first index, its position in indices, length)``."""
    out, pos = [], 0
    for s, e in runs_of(indices):
        out.append((s, pos, e - s))
        pos += e - s
    return out


# ---- runs ------------------------------------------------------------------------------------------------
def gather_runs(t: torch.Tensor, runs: Runs, dim: int = -1) -> torch.Tensor:
    """Concatenate ``t``'s slices along ``dim`` for each half-open run (a view when there is one run)."""
    if len(runs) == 1:
        s, e = runs[0]
        return t.narrow(dim, s, e - s)
    return torch.cat([t.narrow(dim, s, e - s) for s, e in runs], dim=dim)


def add_runs_(t: torch.Tensor, runs: Runs, vals: torch.Tensor, dim: int = -1) -> None:
    """``t[..., runs] += vals`` along ``dim``, where ``vals`` holds the runs' positions back to back."""
    off = 0
    for s, e in runs:
        t.narrow(dim, s, e - s).add_(vals.narrow(dim, off, e - s))
        off += e - s


def write_runs_(t: torch.Tensor, runs: Runs, vals: torch.Tensor, dim: int = -1) -> None:
    """``t[..., runs] = vals`` along ``dim`` (``vals`` back to back, cast to ``t``'s dtype)."""
    off = 0
    for s, e in runs:
        t.narrow(dim, s, e - s).copy_(vals.narrow(dim, off, e - s))
        off += e - s


def read_block(w: torch.Tensor, feature: str, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` of a logical ``(out, in)`` weight for ``"out"``, columns for ``"in"`` (a copy)."""
    return w.index_select(feature_dim(feature), idx.to(w.device))


# ---- merge and split -------------------------------------------------------------------------------------
def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where base + Δ is summed: fp32, or fp64 for an fp64 base (which must stay exact)."""
    return torch.promote_types(dtype, torch.float32)


def merge_values(base: torch.Tensor, *terms: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``cast(base_fp32 + Σ terms)``: one fp32 add per term, one cast (to ``dtype``, default the base's)."""
    acc = base.to(accumulation_dtype(base.dtype))
    for t in terms:
        acc = acc + t.to(acc.dtype)
    return acc.to(base.dtype if dtype is None else dtype)


def merged_weight(
    weight: torch.Tensor, deltas: Sequence[torch.Tensor], specs: Sequence[Spec], transposed: bool = False
) -> torch.Tensor:
    """A copy of ``weight`` (its storage layout and dtype) holding ``cast(base_fp32 + Δ)`` at the blocks.

    The same values `merge_adapter` writes into a stock base. A quantized base comes back dense.
    """
    out = dense(weight.detach()).clone()
    w = logical(out, transposed)
    with torch.no_grad():
        for d, (feature, runs) in zip(deltas, specs):
            dim = feature_dim(feature)
            write_runs_(w, runs, merge_values(gather_runs(w, runs, dim), d.detach()), dim)
    return out


@torch.no_grad()
def split_merged_(loaded: torch.Tensor, base: torch.Tensor, specs: Sequence[Spec]) -> list[torch.Tensor]:
    """Split a merged logical weight into base + Δ: returns Δ = loaded − base at each block (fp32 or fp64) and
    writes the base values back into ``loaded`` there, so loading it keeps the base under the blocks."""
    acc = accumulation_dtype(base.dtype)
    deltas = []
    for feature, runs in specs:
        dim = feature_dim(feature)
        base_vals = gather_runs(base, runs, dim)
        deltas.append(gather_runs(loaded, runs, dim).to(acc) - base_vals.to(acc))
        write_runs_(loaded, runs, base_vals, dim)
    return deltas

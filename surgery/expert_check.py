"""Drive every expert directly: each expert's function checked on its own tokens, whatever the router picks.

The logits check feeds 2 x 16 token ids; a router sends them to some experts only (28-34 of 64 per layer at
top-2 on the tiny test models), so a wrong move in an expert no token reaches passed it (issue #22: 2e-7) and
changed the function on other inputs (7.4e-3). Here each experts module's own forward (eager, grouped or
batched, whichever the config picks) is called with the routing forced: ``m`` seeded tokens per expert,
token ``t`` sent to expert ``t // m`` with weight 1, so every expert's output is seen on its own tokens, in
fp32 (`surgery.upcast`; the module's fp32 copy exists only during the call). A check compares those outputs
before and after a change, expert by expert, and names the experts whose function moved.

Calling conventions (transformers 5): ``forward(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])``
(every family with a router outside its experts module; gpt-oss names them router_indices /
routing_weights), and ``forward(hidden [E * m, H])`` with the tokens already sorted per expert (Llama-4,
declared by class name in `_SORTED`). An experts module with another forward is not driven: the certificate
(``experts_not_driven``) and the analysis notes name it, and its couplings are proved by the logits alone.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from surgery.structures import Coupling
from surgery.upcast import fp32_module

TOKENS_PER_EXPERT = 4


@dataclass(frozen=True)
class DrivenExperts:
    """An experts module the check drives: its path, how many experts and the hidden width of its input."""

    path: str
    num_experts: int
    hidden: int


def _hidden_of(model: nn.Module, c: Coupling) -> int | None:
    """The input width of the experts of ``c``: the dim of its down tensor that is neither expert nor channel."""
    for m in c.by_role("down"):
        shape = model.get_parameter(m.param).shape
        pinned = {d for d, _ in m.fixed}
        axis = m.axis % len(shape)
        rest = [shape[d] for d in range(len(shape)) if d not in pinned and d != axis]
        if len(rest) == 1:
            return int(rest[0])
    return None


def experts_to_drive(model: nn.Module, couplings: Iterable[Coupling]) -> tuple[list[DrivenExperts], list[str]]:
    """The experts modules holding the per-expert couplings among ``couplings`` (named ``<experts>.<e>``),
    and the notes for those that cannot be driven (their forward has no known calling convention)."""
    found: dict[str, set[int]] = {}
    hidden: dict[str, int | None] = {}
    for c in couplings:
        if c.parent is None or c.kind != "ffn":
            continue
        path, _, e = c.name.rpartition(".")
        if not e.isdigit():
            continue
        found.setdefault(path, set()).add(int(e))
        if hidden.get(path) is None:
            hidden[path] = _hidden_of(model, c)
    driven, notes = [], []
    for path in sorted(found):
        module = model.get_submodule(path)
        count = getattr(module, "num_experts", None)
        count = count if isinstance(count, int) and count > max(found[path]) else max(found[path]) + 1
        if _convention(module) is None or hidden[path] is None:
            notes.append(f"{path} ({type(module).__name__}): forward{_signature(module)} is not a known experts call")
            continue
        driven.append(DrivenExperts(path, count, hidden[path]))
    return driven, notes


def _signature(module: nn.Module) -> str:
    try:
        return str(inspect.signature(module.forward))
    except (TypeError, ValueError):
        return "(?)"


# Experts modules whose forward takes the hidden states already sorted per expert, read from their source.
_SORTED = {"Llama4TextExperts"}


def _convention(module: nn.Module) -> str | None:
    """ "routed" for forward(hidden, index, weights), "sorted" for a declared forward(hidden) sorted per
    expert, else None (not driven: a guess could drive the wrong experts)."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) >= 3 and all(p.default is not p.empty for p in positional[3:]):
        return "routed"
    if len(positional) == 1 and type(module).__name__ in _SORTED:
        return "sorted"
    return None


def _output(out: object) -> torch.Tensor:
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"experts forward returned {type(out).__name__}, not a tensor")
    return out


@torch.no_grad()
def expert_outputs(model: nn.Module, d: DrivenExperts, *, seed: int = 0) -> torch.Tensor:
    """Every expert's output on its own ``TOKENS_PER_EXPERT`` seeded tokens, computed in fp32 (fp64 for an fp64
    module): ``[E, m, H]`` on the host (a check keeps one per driven module across a change)."""
    module = model.get_submodule(d.path)
    m, e = TOKENS_PER_EXPERT, d.num_experts
    weight = next((p for p in module.parameters() if p.is_floating_point()), None)
    device = weight.device if weight is not None else torch.device("cpu")
    dtype = torch.float64 if weight is not None and weight.dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(e * m, d.hidden, generator=g, dtype=dtype).to(device)
    with fp32_module(module):
        if _convention(module) == "sorted":
            out = _output(module(x))
        else:
            index = torch.arange(e, device=device).repeat_interleave(m).unsqueeze(1)
            out = _output(module(x, index, torch.ones(e * m, 1, device=device, dtype=dtype)))
    return out.reshape(e, m, d.hidden).detach().to(dtype).cpu()


@dataclass
class ExpertsComparison:
    """Per-expert outputs compared: the largest difference relative to each expert's output scale, and the
    experts (``path[e]``) beyond ``tolerance``."""

    checked: int
    rel_diff: float
    tolerance: float
    failed: list[str]
    detail: list[str]

    @property
    def passed(self) -> bool:
        return not self.failed


def compare_experts(
    driven: list[DrivenExperts], before: list[torch.Tensor], after: list[torch.Tensor], tolerance: float
) -> ExpertsComparison:
    """Expert by expert: max |Δ| / max |output| of that expert against ``tolerance`` (non-finite fails)."""
    worst, failed, detail, checked = 0.0, [], [], 0
    for d, b, a in zip(driven, before, after, strict=True):
        b, a = b.double(), a.double()
        diff = (a - b).flatten(1).abs().amax(1)
        scale = b.flatten(1).abs().amax(1).clamp_min(1e-12)
        rel = diff / scale
        finite = torch.isfinite(a).flatten(1).all(1) & torch.isfinite(b).flatten(1).all(1)
        checked += d.num_experts
        worst = max(worst, float(rel.nan_to_num(float("inf")).max()) if rel.numel() else 0.0)
        for e in range(d.num_experts):
            if not bool(finite[e]) or float(rel[e]) > tolerance:
                failed.append(f"{d.path}[{e}]")
                detail.append(
                    f"expert {e} of {d.path} (coupling '{d.path}.{e}'): |Δ| {float(diff[e]):.2e} = "
                    f"{float(rel[e]):.2e} of its output scale"
                )
    return ExpertsComparison(checked, worst, tolerance, failed, detail)

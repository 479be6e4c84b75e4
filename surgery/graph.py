"""torch-pruning DependencyGraph with the fixes our models need, and a cross-check of couplings against it.

Fixes over torch-pruning 1.6.1 (docs/ARCHITECTURE.md, "Measured facts"): trace in eager attention (sdpa hides
``repeat_kv``), skip negative-dim concats in index mapping (``rotate_half``'s ``cat(dim=-1)`` makes the
GQA index maps cycle forever, VainF/Torch-Pruning#527), a time budget on every traversal so nothing can
hang, a pruner entry for GPT-2 ``Conv1D``, 3-D MoE parameters declared along their hidden axis, and the
model's train/eval mode, ``requires_grad`` flags and attention implementation restored afterwards.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .linear import Conv1D, linear_shape
from .structures import Coupling, Member
from .transaction import deferred_interrupts
from .verify import logits_of

DEFAULT_TIME_BUDGET_S = 60.0
_CHECK_EVERY = 256  # traversal steps between clock reads


class GraphError(RuntimeError):
    """torch-pruning could not build or traverse a dependency graph for this model."""


class GraphTimeout(GraphError):
    """A dependency-graph traversal ran past its time budget (a cycle in torch-pruning's index maps)."""


def _tp():
    try:
        import torch_pruning as tp
    except ImportError as e:  # pragma: no cover
        raise GraphError("torch-pruning is not installed; `pip install torch-pruning`") from e
    return tp


def _conv1d_pruner():
    tp = _tp()

    class Conv1DPruner(tp.pruner.function.BasePruningFunc):
        """GPT-2 Conv1D (weight [in, out]) for graph building only: we never prune, we read groups."""

        TARGET_MODULES = Conv1D

        def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
            raise GraphError("surgery.graph builds graphs for analysis only; it never prunes")

        def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
            raise GraphError("surgery.graph builds graphs for analysis only; it never prunes")

        def get_out_channels(self, layer: nn.Module) -> int:
            return layer.weight.shape[1]

        def get_in_channels(self, layer: nn.Module) -> int:
            return layer.weight.shape[0]

    return Conv1DPruner()


def _attn_configs(model: nn.Module) -> list[tuple[Any, Any]]:
    """Every HF config reachable from the model's modules (and their sub-configs), with its attention impl."""
    todo = [getattr(m, "config", None) for m in model.modules()]
    seen: list[tuple[Any, Any]] = []
    while todo:
        cfg = todo.pop()
        if cfg is None or not hasattr(cfg, "_attn_implementation") or any(cfg is c for c, _ in seen):
            continue
        seen.append((cfg, getattr(cfg, "_attn_implementation_internal", cfg._attn_implementation)))
        todo += [getattr(cfg, k, None) for k in getattr(cfg, "sub_configs", {}) or {}]
    return seen


def _set_attn(cfg: Any, impl: Any) -> None:
    # Write the field, not the property: the property setter also overwrites every sub-config.
    if hasattr(cfg, "_attn_implementation_internal"):
        cfg._attn_implementation_internal = impl
    else:
        cfg._attn_implementation = impl


@contextlib.contextmanager
def _no_leftover_hooks(model: nn.Module) -> Iterator[None]:
    """Remove every hook registered on the model's modules while inside, whatever happens.

    torch-pruning registers a forward hook per prunable module and removes them only when its traced forward
    returns; a forward that raises (PhiMoE's router subclasses nn.Linear and returns a tuple) left them all
    on the model, and every later call of the model failed.
    """
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    extras = ("_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs")
    before = {m: {k: set(getattr(m, k, {})) for k in kinds} for m in model.modules()}
    try:
        yield
    finally:
        with deferred_interrupts():
            _drop_new_hooks(model, before, kinds, extras)


def _drop_new_hooks(model: nn.Module, before: dict, kinds: tuple, extras: tuple) -> None:
    for m in model.modules():
        for k in kinds:
            hooks = getattr(m, k, {})
            for hid in [h for h in hooks if h not in before.get(m, {}).get(k, set())]:
                del hooks[hid]
                for extra in extras:
                    getattr(m, extra, {}).pop(hid, None)


@contextlib.contextmanager
def traced_state(model: nn.Module) -> Iterator[None]:
    """Eager attention, grad-enabled params; restores attention impl, train/eval modes and requires_grad."""
    modes = {m: m.training for m in model.modules()}
    flags = {p: p.requires_grad for p in model.parameters()}
    configs = _attn_configs(model)
    try:
        for cfg, _ in configs:
            _set_attn(cfg, "eager")  # read at forward time by HF attention modules
        for p in flags:
            if p.is_floating_point():
                p.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        with deferred_interrupts():  # an interrupt cannot leave the model half-restored
            for cfg, impl in configs:
                _set_attn(cfg, impl)
            for p, f in flags.items():
                p.requires_grad_(f)
            for m, t in modes.items():
                m.training = t


class _Budget:
    def __init__(self, seconds: float, what: str) -> None:
        self.deadline = time.monotonic() + seconds
        self.seconds = seconds
        self.what = what
        self.steps = 0

    def tick(self) -> None:
        self.steps += 1
        if self.steps % _CHECK_EVERY == 1 and time.monotonic() > self.deadline:
            raise GraphTimeout(
                f"torch-pruning {self.what} exceeded its {self.seconds:.0f}s budget after {self.steps} steps "
                "(an index-mapping cycle); the model has a construct the graph cannot map"
            )


@contextlib.contextmanager
def _patched(budget: _Budget, fix_concat: bool = True) -> Iterator[None]:
    """Skip negative-dim concats in index mapping and bound every traversal by ``budget``."""
    _tp()  # clear error when torch-pruning is missing
    from torch_pruning.dependency import constants
    from torch_pruning.dependency import dependency as dep_mod
    from torch_pruning.dependency import index_mapping as im

    orig_concat = im.update_concat_index_mapping
    orig_trig = dep_mod.Dependency.is_triggered_by

    def concat(graph: Any, node: Any) -> None:
        dim = getattr(node.grad_fn, "_saved_dim", None)
        if isinstance(dim, int) and dim >= constants.MAX_VALID_DIM:
            return  # a negative dim (stored unsigned): not a channel concat (e.g. rotate_half)
        orig_concat(graph, node)

    def triggered(self: Any, pruning_fn: Any) -> bool:
        budget.tick()
        return orig_trig(self, pruning_fn)

    try:
        if fix_concat:
            im.update_concat_index_mapping = concat
        dep_mod.Dependency.is_triggered_by = triggered
        yield
    finally:
        with deferred_interrupts():
            im.update_concat_index_mapping = orig_concat
            dep_mod.Dependency.is_triggered_by = orig_trig


def _example_inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    cfg = getattr(model, "config", None)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg  # composite models: the text side
    vocab = int(getattr(cfg, "vocab_size", 0) or getattr(text, "vocab_size", 0) or 0)
    if vocab <= 0:
        raise GraphError("cannot make example inputs: the model has no config.vocab_size; pass example_inputs")
    sizes = {int(v) for v in vars(cfg).values() if isinstance(v, int) and not isinstance(v, bool)}
    seq = next(n for n in (5, 7, 11, 13, 17, 19) if n not in sizes)  # avoid shape-inference coincidences
    g = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    ids = torch.randint(0, min(vocab, 100), (1, seq), generator=g).to(device)
    return {"input_ids": ids}


def _forward(model: nn.Module, inputs: Any) -> torch.Tensor:
    if isinstance(inputs, dict):
        try:
            out = model(**inputs, use_cache=False)  # no KV cache objects in the traced outputs
        except TypeError:
            out = model(**inputs)
    else:
        out = model(inputs)
    return logits_of(out)


def _unwrapped(model: nn.Module) -> list[tuple[nn.Parameter, int]]:
    """Bare >=3-D params (fused MoE experts): declare their hidden axis so the residual groups stay right."""
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    out = []
    for _, p in model.named_parameters():
        if p.dim() >= 3:
            dims = [i for i, s in enumerate(p.shape) if s == hidden and i > 0]
            out.append((p, dims[-1] if dims else p.dim() - 1))
    return out


def build_graph(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    time_budget_s: float = DEFAULT_TIME_BUDGET_S,
) -> Any:
    """Trace ``model`` into a torch-pruning DependencyGraph (eager attention, our fixes); model unchanged."""
    tp = _tp()
    for name, p in model.named_parameters():
        if p.is_meta:
            raise GraphError(f"parameter {name!r} is on the meta device; materialize the model before analysis")
    if torch.is_inference_mode_enabled():
        raise GraphError("graph tracing needs autograd; call outside torch.inference_mode()")
    inputs = _example_inputs(model) if example_inputs is None else example_inputs
    pruners = {Conv1D: _conv1d_pruner()} if Conv1D is not None else None
    budget = _Budget(time_budget_s, "graph build")
    with traced_state(model), _patched(budget), _no_leftover_hooks(model):
        try:
            dg = tp.DependencyGraph().build_dependency(
                model,
                example_inputs=inputs,
                forward_fn=_forward,
                unwrapped_parameters=_unwrapped(model),
                customized_pruners=pruners,
                verbose=False,
            )
        except GraphError:
            raise
        except Exception as e:  # torch-pruning raises bare asserts/TypeErrors on unknown constructs
            raise GraphError(f"torch-pruning could not trace {type(model).__name__}: {type(e).__name__}: {e}") from e
    dg._s2_names = {m: n for n, m in model.named_modules()} | {p: n for n, p in model.named_parameters()}
    return dg


def coupled_indices(
    dg: Any,
    module: nn.Module,
    feature: str,
    idxs: Sequence[int],
    *,
    time_budget_s: float = DEFAULT_TIME_BUDGET_S,
    fix_concat: bool = True,
) -> dict[tuple[str, str], set[tuple[int, int]]]:
    """The graph's group for ``idxs`` of ``module``'s ``feature`` axis: (name, feature) -> {(root, idx)}.

    ``fix_concat=False`` reproduces stock torch-pruning (hangs on GQA+RoPE; the budget stops it) and
    leaves the concat maps set in ``dg``: use a fresh graph afterwards.
    """
    pruner = dg.get_pruner_of_module(module)
    if pruner is None:
        raise GraphError(f"{type(module).__name__} has no pruner in the dependency graph")
    fn = pruner.prune_out_channels if feature == "out" else pruner.prune_in_channels
    budget = _Budget(time_budget_s, "group traversal")
    with _patched(budget, fix_concat):
        try:
            group = dg.get_pruning_group(module, fn, list(idxs))
        except GraphError:
            raise
        except Exception as e:
            raise GraphError(f"torch-pruning group traversal failed: {type(e).__name__}: {e}") from e
    names = dg._s2_names
    out: dict[tuple[str, str], set[tuple[int, int]]] = {}
    for item in group:
        target = item.dep.target.module
        name = names.get(target)
        if name is None:
            continue  # functional op node (reshape, add, ...)
        feat = "out" if dg.is_out_channel_pruning_fn(item.dep.handler) else "in"
        got = list(item.idxs)
        roots = item.root_idxs
        if roots is None or any(r is None for r in roots):
            # torch-pruning drops root indices across repeat_kv; positions still follow the root order.
            roots = list(idxs) if len(got) == len(idxs) else [None] * len(got)
        pairs = out.setdefault((name, feat), set())
        pairs.update((r, i) for r, i in zip(roots, got, strict=True) if r is not None)
    return out


@dataclass
class CrossCheck:
    """Outcome of comparing couplings with the graph: what agreed, what the graph could not see, conflicts."""

    confirmed: list[str] = field(default_factory=list)
    unconfirmed: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)


def expected_elements(c: Coupling, m: Member) -> list[int]:
    """For each unit-level root element (q-head channel / FFN channel), the element of ``m`` it maps to."""
    if c.kind == "heads":
        d, r = c.head_dim, c.group_size
        out = []
        for j in range(c.size * d):
            h, t = divmod(j, d)
            idx = h // r if m.level == "group" else h
            out.append(m.offset + idx * m.step + (t if m.unit == d else 0))
        return out
    return [m.offset + i * m.step + k for i in range(c.size) for k in range(m.unit)]


def _latent(c: Coupling) -> bool:
    """Multi-head latent attention: keys and values come out of one projection (kv_b) that q does not share,
    and per-head widths may differ; torch-pruning's index maps cannot follow the latent."""
    kv = {m.module for m in c.members if m.role in ("k", "v")}
    q = {m.module for m in c.members if m.role == "q"}
    return (len(kv) == 1 and not kv & q) or any(m.unit != c.head_dim for m in c.members if m.module is not None)


def _root_member(c: Coupling) -> Member | None:
    for role in ("o", "down"):
        for m in c.by_role(role):
            if m.module is not None and m.feature == "in":
                return m
    return None


def cross_check(
    model: nn.Module,
    couplings: Sequence[Coupling],
    dg: Any = None,
    *,
    time_budget_s: float = DEFAULT_TIME_BUDGET_S,
) -> CrossCheck:
    """Compare each heads/ffn coupling with the graph's group rooted at its o / down input features."""
    dg = build_graph(model, time_budget_s=time_budget_s) if dg is None else dg
    modules = dict(model.named_modules())
    res = CrossCheck()
    for c in couplings:
        if c.kind == "experts" or c.parent is not None:
            res.unconfirmed.append(f"{c.name}: MoE experts are not representable in the graph")
            continue
        if c.kind == "heads" and _latent(c):
            res.unconfirmed.append(f"{c.name}: keys and values from a shared latent (MLA); the probe proves it")
            continue
        if c.by_role("q_gate"):  # torch-pruning maps a chunk of a per-head view as if it were flat
            res.unconfirmed.append(
                f"{c.name}: per-head [query | gate] rows are beyond the graph; the probe proves them"
            )
            continue
        root = _root_member(c)
        if root is None:
            res.unconfirmed.append(f"{c.name}: no plain o/down input member to root a graph query")
            continue
        root_elems = expected_elements(c, root)
        found = coupled_indices(dg, modules[root.module], "in", root_elems, time_budget_s=time_budget_s)
        expected: dict[tuple[str, str], set[tuple[int, int]]] = {}
        strided = {(m.module, m.feature) for m in c.members if m.stride is not None and m.stride != m.unit}
        for m in c.members:
            if m.module is None or m.fixed:
                continue
            pairs = set(zip(root_elems, expected_elements(c, m), strict=True))
            expected.setdefault((m.module, m.feature), set()).update(pairs)
        for key, want in expected.items():
            got = found.get(key)
            label = f"{key[0]} ({key[1]} features)"
            shape = linear_shape(modules[key[0]])
            width = shape[1] if key[1] == "out" else shape[0]
            if not got:
                res.unconfirmed.append(f"{c.name}: graph does not link {label}")
            elif any(not 0 <= i < width for _, i in got):
                res.unconfirmed.append(f"{c.name}: graph's index map for {label} leaves the tensor (unmappable op)")
            elif not got <= want and key in strided:  # torch-pruning maps a split of a per-head view as flat
                res.unconfirmed.append(
                    f"{c.name}: graph maps per-head interleaved {label} as flat; the probe proves it"
                )
            elif not got <= want:
                bad = sorted(got - want)[:4]
                res.conflicts.append(
                    f"layer {c.layer} {c.name}: graph couples {label} differently from the config-derived "
                    f"layout, e.g. (root element, element) {bad}"
                )
            elif got == want:
                res.confirmed.append(f"{c.name}: {label}")
            else:
                res.unconfirmed.append(f"{c.name}: graph links only {len(got)}/{len(want)} of {label}")
        prefix = c.name + "."
        for (name, feat), _ in found.items():
            mod = modules.get(name)
            if (
                (name, feat) in expected
                or not name.startswith(prefix)
                or mod is None
                or linear_shape(mod) is None
                or 1 in linear_shape(mod)[:2]  # size-1 (broadcast) layers are never coupling members
            ):
                continue
            res.conflicts.append(
                f"layer {c.layer} {c.name}: graph couples {name} ({feat} features) but the coupling has no "
                "member for it"
            )
    return res

"""Read trained S²FT deltas into an `Adapter` in original index space (or diff two stock models)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from s2ft_lightning.adapters.format import (
    Adapter,
    AdapterError,
    BaseCheck,
    BlockDelta,
    Feature,
    get_module,
    module_kind,
)
from s2ft_lightning.blocks import feature_dim, read_block
from s2ft_lightning.deltas import DeltaBlocks
from s2ft_lightning.experts import ExpertBlocks
from s2ft_lightning.sharding import full
from s2ft_lightning.state import S2State
from surgery.linear import logical_weight, resolve_linear, split_expert_name
from surgery.plan import S2Plan, model_fingerprint


def block_delta(
    module: str, feature: Feature, original: Iterable[int], delta: torch.Tensor, base: torch.Tensor
) -> BlockDelta:
    """One trained block moved to original index space.

    ``delta``/``base`` are the block's update and the base values under it, in trained-position order (rows
    ``(k, in)`` or columns ``(out, k)``, logical orientation), listed against their ``original`` indices; ``base``
    in the base dtype. The other axis is never permuted by a plan (a coupling moves one feature axis of a module).
    """
    original = [int(i) for i in original]
    if delta.shape != base.shape or delta.shape[feature_dim(feature)] != len(original):
        raise AdapterError(
            f"{module}: delta {tuple(delta.shape)} / base block {tuple(base.shape)} do not match "
            f"{len(original)} trained {feature!r} features"
        )
    base = base.detach().cpu()
    return BlockDelta(module, feature, original, delta.detach().cpu().float().contiguous(), [BaseCheck.of(base)])


def diff_adapter(
    base: torch.nn.Module,
    tuned: torch.nn.Module,
    targets: Mapping[str, Mapping[str, Iterable[int]]],
    base_model: str | None = None,
    name: str | None = None,
) -> Adapter:
    """Adapter from two stock models (same architecture), at ``targets[module][feature] = indices``."""
    blocks, shapes, kinds = [], {}, {}
    for mod_name, feats in targets.items():
        mb, mt = get_module(base, mod_name), get_module(tuned, mod_name)
        wb, wt = logical_weight(mb), logical_weight(mt)
        shapes[mod_name], kinds[mod_name] = tuple(wb.shape), module_kind(mb)
        for feature, idx in feats.items():
            idx_t = torch.tensor([int(i) for i in idx], dtype=torch.long)
            base_vals = read_block(wb, feature, idx_t)
            delta = read_block(wt, feature, idx_t).float() - base_vals.float()
            blocks.append(block_delta(mod_name, feature, idx_t.tolist(), delta, base_vals))
    adapter = Adapter(blocks, model_fingerprint(base), shapes, kinds, base_model=base_model, name=name)
    adapter.metadata.update(model_facts(base, shapes))
    adapter.validate()
    return adapter


def extract_adapter(
    model: torch.nn.Module,
    plan: S2Plan,
    base_model: str | None = None,
    name: str | None = None,
) -> Adapter:
    """Read the trained S2 deltas of an installed (permuted) model into an adapter in original index space.

    On a sharded model call it on every rank: each delta and the base values under it are gathered, one
    module at a time, never the whole model.

    The delta is the layer's trained update as is (the fp32 master when there is one); the base checks hash
    the frozen base values under it (the values kept before quantizing, for a quantized base). Several slices of
    one module and feature (e.g. GQA runs split over slices) become one block.
    """
    state = S2State.checked(model)
    kept = {} if state is None else state.base_blocks
    parts: dict[tuple[str, str], list[BlockDelta]] = {}
    shapes, kinds = {}, {}
    for s in plan.slices:
        try:
            wrapper = model.get_submodule(s.module)
        except AttributeError as e:
            raise AdapterError(f"plan module {s.module!r} is not in the model") from e
        if not isinstance(wrapper, DeltaBlocks):
            raise AdapterError(
                f"module {s.module!r} is a {type(wrapper).__name__}, not an installed S2 layer; extract from "
                "the model prepared with this plan (before uninstall), or use diff_adapter on plain models"
            )
        match = [i for i, t in enumerate(wrapper.slices) if t.feature == s.feature and list(t.runs) == list(s.runs)]
        if not match:
            raise AdapterError(f"the S2 wrapper of {s.module!r} has no block for slice runs {s.runs}; wrong plan?")
        i = match[0]
        shapes[s.module] = (wrapper.out_features, wrapper.in_features)
        kind = "conv1d" if wrapper.transposed else "linear"
        kinds[s.module] = "expert" if isinstance(wrapper, ExpertBlocks) else kind
        base = kept[s.module][i].clone() if s.module in kept else wrapper.base_block(i)  # collectives when sharded
        delta = full(wrapper.deltas[i])
        parts.setdefault((s.module, s.feature), []).append(block_delta(s.module, s.feature, s.original, delta, base))
    blocks = []
    for (module, feature), bs in parts.items():
        if len(bs) == 1:
            blocks.append(bs[0])
            continue
        axis = 0 if feature == "out" else 1
        blocks.append(
            BlockDelta(
                module,
                feature,
                [i for b in bs for i in b.indices],
                torch.cat([b.delta for b in bs], dim=axis),
                [BaseCheck(c.dtype, c.sha256, c.sha256_bf16, b.indices) for b in bs for c in b.base_checks],
            )
        )
    adapter = Adapter(blocks, plan.fingerprint, shapes, kinds, base_model=base_model, name=name)
    adapter.metadata["plan_settings"] = {k: v for k, v in plan.settings.items() if k not in ("couplings", "tied")}
    adapter.metadata.update(model_facts(model, shapes))
    adapter.validate()
    return adapter


MODEL_FACTS = ("architecture", "encoder_decoder", "expert_counts", "expert_storage")


def model_facts(model: torch.nn.Module, modules) -> dict:
    """What a LoRA export needs to know about the base beyond the blocks: its architecture (PEFT's task type
    follows from it), the expert count of every experts tensor the adapter touches (experts that trained
    nothing have no block, so the blocks alone undercount them) and how non-plain experts tensors store one
    expert: ``stored`` ``"in_out"`` (transposed), ``stacked`` (2-D ``[E·I, H]``) and ``flags_transposed``
    (the module declares ``is_transposed``, which PEFT reads)."""
    facts: dict = {
        "architecture": type(model).__name__,
        "encoder_decoder": bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False)),
    }
    experts, storage = {}, {}
    for name in modules:
        if split_expert_name(name) is None:
            continue
        lin = resolve_linear(model, name)
        key = name.rpartition("[")[0]
        st = lin.storage
        experts[key] = int(st.experts if st is not None else getattr(lin.owner, lin.param).shape[0])
        if st is not None and (st.channels_last or st.stacked):
            transposed = st.channels_last or lin.param == st.down  # DBRX's w2 rows are down's input channels
            storage[key] = {
                "stored": "in_out" if transposed else "out_in",
                "stacked": st.stacked,
                "flags_transposed": bool(getattr(lin.owner, "is_transposed", False)),
            }
    if storage:
        facts["expert_storage"] = storage
    if experts:
        facts["expert_counts"] = experts
    return facts

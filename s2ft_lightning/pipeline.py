"""The S²FT model pipeline: analyse → select → plan → permute + verify → install S2 layers, all-or-nothing.

Pure torch (no Lightning): `prepare_model` is what `S2FTModule`, the `S2FT` callback (through
`s2ft_lightning.attach`) and plain PyTorch users call. It runs as one transaction on the model
(`surgery.transaction`): every refusal that can be decided before anything moves comes first, and any
exception or interrupt at any later stage (the analysis probe, the permutation, its verification, the install)
undoes every change in reverse order. What it did is recorded in the model's `S2State`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable, Iterable
from typing import Literal

import torch
from torch import nn

from s2ft_lightning import layers
from s2ft_lightning.blocks import feature_dim
from s2ft_lightning.sharding import is_sharded
from s2ft_lightning.state import S2State
from surgery.analyze import analyze
from surgery.config import SelectionConfig, SelectionError
from surgery.linear import logical_weight, resolve_linear
from surgery.plan import PlanError, S2Plan, model_fingerprint
from surgery.planner import applied_plan as _applied
from surgery.planner import apply_plan, make_plan, plan_id
from surgery.transaction import check_intact, transaction

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class S2Config(SelectionConfig):
    """What S²FT trains and how: the selection (`surgery.config.SelectionConfig`) plus training-side settings.

    Args:
        verify: Check on seeded inputs that the permuted model computes the same function (max |Δlogits| <= 1e-4
            of the logit scale in fp32) before training; the model is restored if not.
        master_dtype: Dtype of the trained deltas on a bf16/fp16 base: "fp32" keeps small updates from being
            rounded away; "base" trains in the base dtype.
    """

    verify: bool = True
    master_dtype: Literal["fp32", "base"] = "fp32"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.verify, bool):
            raise ValueError(f"S2Config.verify={self.verify!r} must be true or false")
        if self.master_dtype not in ("fp32", "base"):
            raise ValueError(f"S2Config.master_dtype={self.master_dtype!r} is not one of ['fp32', 'base']")


def applied_plan(model: nn.Module) -> S2Plan | None:
    """The plan S²FT applied to this model (it is permuted by it), or None."""
    return _applied(model)


def base_fingerprint(model: nn.Module) -> str:
    """`surgery.plan.model_fingerprint` of the base, whether or not S2 layers (and their deltas) are installed."""
    return model_fingerprint(model, exclude=lambda name: name.rsplit(".", 1)[-1].startswith("delta_"))


def _check_materialized(model: nn.Module) -> None:
    if is_sharded(model):
        raise ValueError(
            "the model is already sharded (DTensor parameters); S²FT permutes and verifies whole weights, so it "
            "prepares first and shards after: remove your fully_shard calls, S²FT shards the model itself under "
            "ModelParallelStrategy"
        )
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:
        raise ValueError(
            f"{len(meta)} parameters of the model are on the meta device (e.g. {meta[0]!r}); S²FT permutes and "
            "verifies real weights. Load the weights first (from_pretrained without init_empty_weights / "
            "device_map='meta', or to_empty() + load_state_dict) and prepare after that"
        )


def _differences(a: S2Config, b: S2Config) -> list[str]:
    """Settings of two configs that would prepare the model differently (``verify`` does not)."""
    da, db = dataclasses.asdict(a), dataclasses.asdict(b)
    return [f"{k}={db[k]!r} (prepared with {da[k]!r})" for k in da if k != "verify" and da[k] != db[k]]


def _check_same_config(state: S2State | None, requested: S2Config | None) -> None:
    prepared = None if state is None else state.config
    if requested is None or prepared is None or not isinstance(requested, S2Config):
        return
    diff = _differences(prepared, requested)
    if diff:
        raise PlanError(
            f"this model is already prepared with another S2 config ({'; '.join(diff)}); its plan stays as it is. "
            "To train other heads/channels, load the base again and prepare that copy (or call "
            "layers.uninstall(model, merge=False) and surgery.planner.unapply_plan(model) first)"
        )


def prepare_model(
    model: nn.Module,
    config: S2Config | None = None,
    *,
    plan: S2Plan | None = None,
    calibration: Iterable | None = None,
) -> S2Plan:
    """Make ``model`` S²FT-trainable in place and return the applied plan.

    With ``plan`` (e.g. from a checkpoint or a file) selection is skipped and that plan is applied after its
    fingerprint and consistency are checked. Calling this again on a prepared model returns its plan (so
    Lightning's `configure_model` may call it on every stage); another config or plan is refused. All-or-nothing:
    any refusal, exception or interrupt, at any stage, leaves the model bit-identical and preparable again.
    """
    with transaction(model, "S²FT preparation", S2State):
        return prepare_in_transaction(model, config, plan=plan, calibration=calibration)


def prepare_in_transaction(
    model: nn.Module,
    config: S2Config | None = None,
    *,
    plan: S2Plan | None = None,
    calibration: Iterable | None = None,
    checks: Iterable[Callable[[nn.Module], None]] = (),
) -> S2Plan:
    """`prepare_model` inside the model's running transaction (`s2ft_lightning.attach` adds quantization and
    sharding to the same one). ``checks`` are further refusals to make before anything moves."""
    requested = config
    config = config or S2Config()
    master = torch.float32 if config.master_dtype == "fp32" else None
    state = S2State.of(model)
    existing = applied_plan(model)
    if layers.installed(model):
        if existing is None:
            raise PlanError("S2 layers are installed on this model without an applied plan; uninstall them first")
        if plan is not None and plan_id(plan) != plan_id(existing):
            raise PlanError(
                "this model was already prepared with a different S2 plan; load a fresh base model to apply another"
            )
        if plan is None:
            _check_same_config(state, requested)
        for check in checks:
            check(model)
        return existing
    t0 = time.perf_counter()
    if existing is not None:  # permuted earlier (e.g. uninstalled without unpermuting): install the same plan
        if plan is not None and plan_id(plan) != plan_id(existing):
            raise PlanError(
                "this model is already permuted by a different S2 plan; load a fresh base model to apply another"
            )
        for check in checks:
            check(model)
        plan = existing
    else:
        _check_materialized(model)
        if plan is None and config.needs_data and not calibration:
            raise SelectionError(
                f"strategy {config.strategy!r} scores heads/channels on calibration batches, but none were given: "
                "pass calibration=[{'input_ids': ...}, ...] (the S2FT callback and S2FTModule take them from the "
                "trainer's data), or use strategy 'random' or 'weight', which need no data"
            )
        if plan is not None:
            layers.check_installable(model, plan, master_dtype=master, permuted=False)
        for check in checks:
            check(model)
        structures = analyze(model) if plan is None or plan.settings.get("couplings") is None else None
        if plan is None:
            plan = make_plan(model, structures, config, calibration=calibration)
            layers.check_installable(model, plan, master_dtype=master, permuted=False)  # before any surgery
        plan = apply_plan(model, plan, structures, verify=config.verify)
    layers.install(model, plan, master_dtype=master)
    state = S2State.of(model)
    state.config = config
    state.base_values = base_values_digest(model, plan)
    n = sum(p.numel() for p in layers.block_parameters(model))
    log.info("S2FT prepared %d trainable weights in %.1fs", n, time.perf_counter() - t0)
    return plan


@torch.no_grad()
def base_values_digest(model: nn.Module, plan: S2Plan) -> str:
    """Hash of the frozen base values under the plan's blocks, read in ORIGINAL index order.

    Same value on a stock base (reads the ``original`` indices) and on the prepared model (reads the permuted
    positions; the deltas are not included), so a checkpoint can refuse a different base of the same shape.
    """
    check_intact(model)
    permuted = applied_plan(model) is not None
    h = hashlib.sha256()
    for s in sorted(plan.slices, key=lambda s: (s.module, s.feature, s.runs[0])):
        w = logical_weight(resolve_linear(model, s.module))
        dim = feature_dim(s.feature)
        idx = torch.tensor(s.positions() if permuted else s.original, dtype=torch.long, device=w.device)
        vals = w.index_select(dim, idx).to(torch.bfloat16).float().contiguous().cpu()  # dtype-independent
        h.update(f"{s.module}:{s.feature}:{tuple(vals.shape)};".encode())
        h.update(vals.numpy().tobytes())
    return h.hexdigest()[:16]

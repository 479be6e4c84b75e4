"""The S²FT model pipeline shared by `S2FTModule` and the `S2FT` callback.

analyze → select → plan → permute + verify → install S2 layers, all on one `nn.Module`, idempotently.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import nn

from s2ft_lightning import layers
from surgery.analyze import analyze
from surgery.plan import PlanError, S2Plan
from surgery.planner import apply_plan, make_plan

log = logging.getLogger(__name__)

_PLAN_ATTR = "_s2ft_plan"


@dataclass
class S2Config:
    """What S²FT trains. Ratios are fractions of heads (o, v) or FFN channels (u, d) per layer.

    The paper's recipes train O and Down columns: LLaMA2-7B o_ratio 0.052 + d_ratio 0.02;
    LLaMA3-8B d_ratio 0.03.
    """

    o_ratio: float = 0.0
    v_ratio: float = 0.0
    u_ratio: float = 0.0
    d_ratio: float = 0.02
    strategy: Literal["random", "weight", "activation", "weight_activation", "gradient"] = "random"
    variant: Literal["large", "small"] = "large"
    allocation: Literal["even", "global"] = "even"
    seed: int = 42
    verify: bool = True
    # Block parameters are kept in this dtype when the base is half precision ("fp32" keeps small
    # updates from being rounded away); "base" trains in the base dtype.
    master_dtype: Literal["fp32", "base"] = "fp32"

    def ratios(self) -> dict[str, float]:
        return {"o_ratio": self.o_ratio, "v_ratio": self.v_ratio, "u_ratio": self.u_ratio, "d_ratio": self.d_ratio}

    def to_dict(self) -> dict:
        return asdict(self)


def applied_plan(model: nn.Module) -> S2Plan | None:
    """The plan S²FT applied to this model, or None when it has not been prepared."""
    return getattr(model, _PLAN_ATTR, None)


def prepare_model(
    model: nn.Module,
    config: S2Config,
    *,
    plan: S2Plan | None = None,
    calibration: Iterable | None = None,
) -> S2Plan:
    """Make ``model`` S²FT-trainable in place and return the applied plan.

    With ``plan`` given (e.g. restored from a checkpoint or file) selection is skipped and that plan
    is applied after its fingerprint is checked. Calling this twice on the same model returns the
    plan already applied, so Lightning's `configure_model` can call it on every stage.
    """
    existing = applied_plan(model)
    if existing is not None:
        if plan is not None and plan.to_dict()["slices"] != existing.to_dict()["slices"]:
            raise PlanError(
                "this model was already prepared with a different S2 plan; load a fresh base model "
                "to apply another plan"
            )
        return existing
    t0 = time.perf_counter()
    structures = analyze(model)
    if plan is None:
        plan = make_plan(
            model,
            structures,
            **config.ratios(),
            strategy=config.strategy,
            variant=config.variant,
            allocation=config.allocation,
            seed=config.seed,
            calibration=calibration,
        )
    plan = apply_plan(model, plan, structures, verify=config.verify)
    master = torch.float32 if config.master_dtype == "fp32" else None
    layers.install(model, plan, master_dtype=master)
    object.__setattr__(model, _PLAN_ATTR, plan)  # a plain attribute, not a submodule or state
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("S2FT prepared %d trainable weights in %.1fs", n, time.perf_counter() - t0)
    return plan

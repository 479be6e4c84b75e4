"""Callbacks that plug S²FT into an existing Lightning project and write its artifacts."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from s2ft_lightning.pipeline import S2Config, applied_plan, prepare_model
from surgery.plan import S2Plan

log = logging.getLogger(__name__)


def _target(pl_module: L.LightningModule, submodule: str) -> nn.Module:
    try:
        return pl_module.get_submodule(submodule) if submodule else pl_module
    except AttributeError as e:
        names = [n for n, _ in pl_module.named_children()]
        raise ValueError(
            f"S2FT callback: {type(pl_module).__name__} has no submodule {submodule!r}; "
            f"its children are {names}. Pass submodule= the attribute path of the HF model."
        ) from e


class S2FT(Callback):
    """Apply S²FT to ``submodule`` of any LightningModule at setup.

    Selection, permutation, verification and layer installation run before the user's
    `configure_optimizers`; at fit start frozen parameters are dropped from every optimizer, so the
    optimizer only ever holds the block parameters even when it was built from ``self.parameters()``.
    """

    def __init__(self, submodule: str = "model", s2: S2Config | None = None, plan_path: str | None = None):
        self.submodule = submodule
        self.s2 = s2 or S2Config()
        self.plan_path = plan_path
        self.plan: S2Plan | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        target = _target(pl_module, self.submodule)
        plan = S2Plan.load(self.plan_path) if self.plan_path else None
        self.plan = prepare_model(target, self.s2, plan=plan)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for opt in trainer.optimizers:
            kept = 0
            for group in opt.param_groups:
                group["params"] = [p for p in group["params"] if p.requires_grad]
                kept += len(group["params"])
            if kept == 0:
                raise RuntimeError(
                    "S2FT callback: the optimizer holds none of the S2 block parameters; build it from "
                    "self.parameters() (or the trainable ones) in configure_optimizers"
                )

    def state_dict(self) -> dict:
        return {"plan": None if self.plan is None else self.plan.to_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict.get("plan")
        if saved and self.plan is not None and saved["slices"] != self.plan.to_dict()["slices"]:
            raise ValueError("checkpoint holds a different S2 plan than the one this S2FT callback applied")


def _find_plan_model(pl_module: L.LightningModule) -> tuple[nn.Module, S2Plan]:
    for m in pl_module.modules():
        plan = applied_plan(m)
        if plan is not None:
            return m, plan
    raise RuntimeError("no S2FT-prepared model found in this LightningModule (use S2FTModule or the S2FT callback)")


class AdapterCheckpoint(Callback):
    """Write the trained blocks as an adapter directory every ``every_n_steps`` and at fit end."""

    def __init__(self, dirpath: str = "adapters", every_n_steps: int = 0, name: str = "default"):
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.name = name

    def _write(self, pl_module: L.LightningModule, tag: str) -> Path:
        from s2ft_lightning.adapters import extract_adapter, save_adapter

        model, plan = _find_plan_model(pl_module)
        adapter = extract_adapter(model, plan, base_model=getattr(pl_module, "model_name", None), name=self.name)
        out = self.dirpath / tag
        save_adapter(adapter, out)
        log.info("wrote S2FT adapter to %s", out)
        return out

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and trainer.is_global_zero:
            self._write(pl_module, f"step-{step}")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self.last_path = self._write(pl_module, self.name)


class MergeAdapters(Callback):
    """At fit end, fold the trained blocks into a plain, unpermuted copy and `save_pretrained` it."""

    def __init__(self, dirpath: str = "merged", dtype: str | None = None):
        self.dirpath = Path(dirpath)
        self.dtype = dtype

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        from s2ft_lightning.export import export_merged

        model, plan = _find_plan_model(pl_module)
        tokenizer = getattr(pl_module, "tokenizer", None)
        dtype = getattr(torch, self.dtype) if self.dtype else None
        export_merged(model, plan, self.dirpath, tokenizer=tokenizer, dtype=dtype)

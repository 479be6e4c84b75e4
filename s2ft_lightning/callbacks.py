"""Callbacks that plug S²FT into an existing Lightning project and write its artifacts."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn

from s2ft_lightning.attach import CHECKPOINT_KEY, S2Attachment
from s2ft_lightning.layers import installed
from s2ft_lightning.pipeline import S2Config, applied_plan
from s2ft_lightning.reporting import run_dir
from surgery.plan import S2Plan

log = logging.getLogger(__name__)


class S2FT(Callback):
    """Apply S²FT to ``submodule`` of any LightningModule, through the same path as `S2FTModule`.

    The model is prepared before the user's `configure_optimizers`: right after `configure_model` when the
    module builds its model there (Lightning's lazy pattern), else at setup. At fit start frozen parameters
    are dropped from every optimizer, so an optimizer built from ``self.parameters()`` holds only what trains.
    Checkpoints hold the trained deltas, the plan and the base identity instead of the frozen base; resuming
    with ``ckpt_path`` applies the checkpoint's plan. To reload in a fresh process, build the module as for
    training and call ``s2ft_lightning.load_checkpoint(module, path)`` (strict key checking).
    """

    def __init__(
        self,
        submodule: str = "model",
        s2: S2Config | None = None,
        plan_path: str | None = None,
        calibration_batches: int = 4,
        quantize: str = "none",
    ):
        self.attachment = S2Attachment(
            s2 or S2Config(),
            submodule=submodule,
            plan_path=plan_path,
            calibration_batches=calibration_batches,
            quantize=quantize,
        )

    @property
    def plan(self) -> S2Plan | None:
        return self.attachment.plan

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if is_overridden("configure_model", pl_module):
            self._run_after(pl_module, "configure_model", trainer)
        elif _has(pl_module, self.attachment.submodule):
            self.attachment.prepare(pl_module, trainer)
        else:  # built in the module's own setup hook, which Lightning runs after the callbacks'
            self._run_after(pl_module, "setup", trainer)

    def _run_after(self, pl_module: L.LightningModule, hook: str, trainer: L.Trainer) -> None:
        """Wrap the instance's ``hook`` so that S²FT prepares the model as soon as it returns."""
        if hook in pl_module.__dict__:
            return  # already wrapped for this module
        original = getattr(pl_module, hook)
        attachment = self.attachment

        @functools.wraps(original)
        def wrapped(*args, **kwargs):
            out = original(*args, **kwargs)
            attachment.prepare(pl_module, trainer)
            return out

        pl_module.__dict__[hook] = wrapped
        self._wrapped = (pl_module, hook)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        module, hook = getattr(self, "_wrapped", (None, None))
        if module is not None:
            module.__dict__.pop(hook, None)
            self._wrapped = (None, None)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for opt in trainer.optimizers:
            kept = 0
            for group in opt.param_groups:
                group["params"] = [p for p in group["params"] if p.requires_grad]
                kept += len(group["params"])
            if kept == 0:
                raise RuntimeError(
                    "S2FT callback: the optimizer holds none of the S2 delta parameters; build it from "
                    "self.parameters() (or the trainable ones) in configure_optimizers"
                )
        out = run_dir(trainer)  # a collective call: every rank
        if trainer.is_global_zero:
            self.attachment.write_provenance(out)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if self.attachment.plan is not None:
            checkpoint[CHECKPOINT_KEY] = self.attachment.checkpoint_metadata(pl_module)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # Lightning loads the module's state before the callbacks': when the checkpoint brings another plan,
        # re-prepare with it and load the state again (no optimizer exists yet).
        if self.attachment.reconcile(pl_module, checkpoint):
            pl_module.load_state_dict(checkpoint["state_dict"], strict=pl_module.strict_loading)


def _has(pl_module: nn.Module, name: str) -> bool:
    try:
        pl_module.get_submodule(name)
    except AttributeError:
        return False
    return True


def _find_plan_model(pl_module: L.LightningModule) -> tuple[nn.Module, S2Plan]:
    for m in pl_module.modules():
        plan = applied_plan(m)
        if plan is not None and installed(m):
            return m, plan
    raise RuntimeError("no S2FT-prepared model found in this LightningModule (use S2FTModule or the S2FT callback)")


class AdapterCheckpoint(Callback):
    """Write the trained blocks as an adapter directory every ``every_n_steps`` and at fit end.

    Args:
        dirpath: Folder of the adapter directories; default: adapter/ in the run's directory.
        every_n_steps: Also write ``step-<n>`` adapters every this many steps (0: only at fit end).
        name: Name of the final adapter's directory (and the name recorded in it).
    """

    def __init__(self, dirpath: str | None = None, every_n_steps: int = 0, name: str = "default"):
        self.dirpath = Path(dirpath) if dirpath else None
        self.every_n_steps = every_n_steps
        self.name = name
        self.written: dict[str, Path] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = run_dir(trainer) / "adapter"  # every rank: log_dir is a collective

    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule, tag: str, metadata: dict | None = None) -> Path:
        from s2ft_lightning.adapters import extract_adapter, save_adapter

        model, plan = _find_plan_model(pl_module)
        # Every rank extracts (a sharded model gathers each delta and the base values under it); rank 0 writes.
        adapter = extract_adapter(model, plan, base_model=getattr(pl_module, "model_name", None), name=self.name)
        adapter.metadata.update(metadata or {})
        out = self.dirpath / tag
        if trainer.is_global_zero:
            save_adapter(adapter, out)
            log.info("wrote S2FT adapter to %s", out)
        return out

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0:
            self._write(trainer, pl_module, f"step-{step}")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.last_path = self._write(trainer, pl_module, self.name)
        if trainer.is_global_zero:
            self.written = {"adapter": self.last_path}


class MergeAdapters(Callback):
    """At fit end, fold the trained blocks into a plain, unpermuted copy and `save_pretrained` it.

    Args:
        dirpath: Folder of the merged model; default: merged/ in the run's directory.
        dtype: Dtype of the saved model (default: the base's), e.g. bfloat16.
    """

    def __init__(self, dirpath: str | None = None, dtype: str | None = None):
        self.dirpath = Path(dirpath) if dirpath else None
        self.dtype = dtype
        self.written: dict[str, Path] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = run_dir(trainer) / "merged"

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from s2ft_lightning.export import export_merged, export_merged_from_adapter
        from s2ft_lightning.models import resolve_dtype
        from s2ft_lightning.sharding import is_sharded

        model, plan = _find_plan_model(pl_module)
        dtype = resolve_dtype(self.dtype) if self.dtype else None
        if is_sharded(model):
            # Never gather the sharded model: every rank extracts the adapter (small gathers), rank 0 merges it
            # into the base read from disk.
            from s2ft_lightning.adapters import extract_adapter

            base = getattr(pl_module, "model_name", None)
            adapter = extract_adapter(model, plan, base_model=base)
            if trainer.is_global_zero:
                path = export_merged_from_adapter(adapter, base, self.dirpath, dtype=dtype)
                self.written = {"merged model": path}
            return
        if trainer.is_global_zero:
            tokenizer = getattr(pl_module, "tokenizer", None)
            self.written = {"merged model": export_merged(model, plan, self.dirpath, tokenizer=tokenizer, dtype=dtype)}

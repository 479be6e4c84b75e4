"""Attach S²FT to a LightningModule: the one preparation path of `S2FTModule` and the `S2FT` callback.

- Which plan: ``plan_path`` if given, else selection (calibration batches from the trainer's data for the
  data-driven strategies); a checkpoint being loaded brings its own plan and wins (`S2Attachment.reconcile`).
- One transaction on the target submodule (`surgery.transaction`): refusals first (quantized + FSDP, NF4 on
  Conv1D or odd shapes, tensor parallelism), then `prepare_model`'s stages, quantization and the checkpoint hooks,
  all undone on any failure; sharding comes last and cannot be undone, so a failure there leaves the model's
  marker. What it did is in the target's `S2State`; the LightningModule holds only this attachment.
- Checkpoints hold only what trains: hooks on the LightningModule cut its state dict to the trainable keys
  (the S2 deltas, plus e.g. a new task head, plus anything outside the target) and, on load, accept a dict
  without the frozen target keys — the frozen base comes from the model itself. ``checkpoint["s2ft"]``
  carries the plan, the S2 config and the base identity (fingerprint + hash of the base values under the
  blocks), which every load checks before the deltas are applied.
- Provenance: ``s2_plan.json`` and ``s2_config.json`` next to the logs.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import nn

from s2ft_lightning import layers
from s2ft_lightning.pipeline import (
    S2Config,
    applied_plan,
    base_fingerprint,
    base_values_digest,
    prepare_in_transaction,
)
from s2ft_lightning.quantize import MODES as QUANT_MODES
from s2ft_lightning.quantize import check_quantizable, quantize_base
from s2ft_lightning.sharding import data_parallel_mesh, is_sharded, shard
from s2ft_lightning.state import S2State, current_form, reset_form, set_form
from surgery.plan import PlanError, S2Plan
from surgery.planner import plan_id, unapply_plan
from surgery.transaction import deferred_interrupts, transaction

CHECKPOINT_KEY = "s2ft"
CHECKPOINT_FORMAT = 1
_ATTR = "_s2ft_attachment"  # the one attribute S²FT sets on a LightningModule


class CheckpointError(PlanError):
    """A checkpoint that is not an S²FT checkpoint or does not belong to this base / plan."""


def attachment_of(pl_module: nn.Module) -> S2Attachment | None:
    """The `S2Attachment` that prepared ``pl_module``, if any (the one attribute it sets on the module)."""
    return pl_module.__dict__.get(_ATTR)


def _submodule(pl_module: nn.Module, name: str) -> nn.Module | None:
    if not name:
        return pl_module
    try:
        return pl_module.get_submodule(name)
    except AttributeError:
        return None


def _check_strategy(trainer: Any) -> None:
    """Refuse Lightning's FSDPStrategy (FSDP1) before anything changes: its flat parameters hide the base values
    the adapters and checkpoints gather, and it runs only on GPUs, where this path has never been tested."""
    strategy = getattr(trainer, "strategy", None)
    if type(strategy).__name__ == "FSDPStrategy":
        raise ValueError(
            "S²FT does not support Lightning's FSDPStrategy (FSDP1 flat parameters); shard with "
            "ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1) instead (FSDP2: S²FT prepares the "
            "model, then shards every decoder layer), or use strategy='ddp' when the model fits one device"
        )


class S2Attachment:
    """Prepares the ``submodule`` of a LightningModule with S²FT and owns its checkpoint format."""

    def __init__(
        self,
        config: S2Config,
        submodule: str = "model",
        plan_path: str | None = None,
        calibration_batches: int = 4,
        quantize: str = "none",
    ) -> None:
        if quantize not in QUANT_MODES:
            raise ValueError(f"quantize={quantize!r} is not one of {list(QUANT_MODES)}")
        self.config = config
        self.quantize = quantize
        self.submodule = submodule
        self.plan_path = plan_path
        self.calibration_batches = calibration_batches
        self.plan: S2Plan | None = None
        self._handles: list = []  # the checkpoint hooks on the LightningModule
        self._form_tokens: list = []  # state-dict form switched by the hooks, one per nested state_dict call
        self._load_prefix = ""

    # ---- preparation ---------------------------------------------------------------------------------
    def target(self, pl_module: nn.Module) -> nn.Module:
        """The model S²FT applies to, or a ValueError naming the children when it is missing."""
        found = _submodule(pl_module, self.submodule)
        if found is None:
            names = [n for n, _ in pl_module.named_children()]
            raise ValueError(
                f"{type(pl_module).__name__} has no submodule {self.submodule!r} (its children are {names}); pass "
                "submodule= the attribute path of the Hugging Face model, or build it in __init__/configure_model"
            )
        return found

    def prepare(self, pl_module: nn.Module, trainer: Any = None, plan: S2Plan | None = None) -> S2Plan:
        """Prepare the target (idempotent) and hook the module's checkpointing; returns the applied plan.

        All-or-nothing up to sharding (see the module docstring).
        """
        _check_strategy(trainer)
        target = self.target(pl_module)
        if plan is None and self.plan_path:
            plan = S2Plan.load(self.plan_path)
        mesh = getattr(pl_module, "device_mesh", None)  # set by Lightning's ModelParallelStrategy
        dp_mesh = data_parallel_mesh(mesh) if mesh is not None and not is_sharded(target) else None
        calibration = None
        if plan is None and applied_plan(target) is None and self.config.needs_data:
            calibration = self._calibration(pl_module, trainer)
        refuse = functools.partial(check_quantizable, mode=self.quantize, sharded=mesh is not None)
        with transaction(target, "S²FT preparation", S2State) as txn:
            prepared = prepare_in_transaction(target, self.config, plan=plan, calibration=calibration, checks=[refuse])
            quantize_base(target, self.quantize)  # after the base values were read: checks keep the original
            self._hook(pl_module, txn)
            if dp_mesh is not None:
                txn.irreversible("sharding the model (FSDP2 fully_shard)")
                shard(target, dp_mesh)
        self.plan = prepared
        return prepared

    def _calibration(self, pl_module: nn.Module, trainer: Any) -> list[dict]:
        loader = _train_loader(pl_module, trainer)
        if loader is None:
            raise ValueError(
                f"strategy {self.config.strategy!r} scores heads/channels on calibration batches, but no training "
                "data is reachable: pass a datamodule (or train_dataloaders) to the trainer, or use strategy 'random' "
                "or 'weight', which need no data"
            )
        batches = []
        for i, batch in enumerate(loader):
            if i >= self.calibration_batches:
                break
            batches.append({k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")})
        return batches

    def _hook(self, pl_module: nn.Module, txn) -> None:
        """Become the module's attachment; its checkpoint hooks (registered once) find the attachment there."""
        previous = attachment_of(pl_module)
        if previous is self:
            return
        txn.on_rollback(functools.partial(_attach_to, pl_module, previous), "the module's attachment")
        if previous is not None:  # the hooks are registered: they find the new attachment (e.g. load_checkpoint's)
            _attach_to(pl_module, self)
            return
        txn.on_rollback(self._unhook, "the checkpoint hooks")
        with deferred_interrupts():
            self._handles = [
                pl_module.register_state_dict_pre_hook(_root_state_dict_pre),
                pl_module.register_state_dict_post_hook(_root_state_dict_post),
                pl_module.register_load_state_dict_pre_hook(_root_load_pre),
                pl_module.register_load_state_dict_post_hook(_root_load_post),
            ]
            _attach_to(pl_module, self)

    def _unhook(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # ---- checkpoints ---------------------------------------------------------------------------------
    def base_values(self, target: nn.Module) -> str | None:
        """The digest of the base values under the blocks, read before quantizing or sharding."""
        state = S2State.of(target)
        return None if state is None else state.base_values

    def checkpoint_metadata(self, pl_module: nn.Module) -> dict:
        """What ``checkpoint["s2ft"]`` holds: plan, config, where the target sits and the base identity."""
        if self.plan is None:
            raise RuntimeError("S²FT has not prepared this module yet; nothing to checkpoint")
        target = self.target(pl_module)
        state = S2State.checked(target)
        return {
            "format": CHECKPOINT_FORMAT,
            "submodule": self.submodule,
            "plan": self.plan.to_dict(),
            "config": self.config.to_dict(),
            "base_fingerprint": base_fingerprint(target),
            "base_values": self.base_values(target),
            "quantize": "none" if state is None else state.quantized,
            "trainable": {n: list(p.shape) for n, p in target.named_parameters() if p.requires_grad},
        }

    def check_base(self, target: nn.Module, meta: dict, plan: S2Plan) -> None:
        """Refuse a base other than the one the checkpoint was trained on (architecture or touched values).

        ``target`` is stock or prepared with ``plan`` (the digest reads the plan's positions accordingly).
        """
        fp = base_fingerprint(target)  # names and global shapes: the same sharded or not
        if fp != meta.get("base_fingerprint"):
            raise CheckpointError(
                f"this checkpoint was trained on a base with fingerprint {meta.get('base_fingerprint')} but the "
                f"model has {fp} (another architecture or config); load the base it was trained from"
            )
        current = applied_plan(target)
        known = current is not None and plan_id(current) == plan_id(plan) and self.base_values(target) is not None
        digest = self.base_values(target) if known else base_values_digest(target, plan)
        if digest != meta.get("base_values"):
            raise CheckpointError(
                "the base weights under the checkpoint's S2 blocks differ from the ones it was trained on "
                f"({meta.get('base_values')} vs {digest}): same architecture, another checkpoint? Load the exact base"
            )

    def reconcile(self, pl_module: nn.Module, checkpoint: dict) -> bool:
        """Check the checkpoint's base, then make its plan the module's (re-preparing if needed).

        Returns True when the target was (re)prepared here, so state loaded before this call must be loaded
        again. Lightning restores before it configures optimizers, so re-preparing is safe there. All-or-nothing:
        a refused base or any failure leaves the module prepared as it was.
        """
        meta = read_metadata(checkpoint)
        plan = S2Plan.from_dict(meta["plan"])
        target = self.target(pl_module)
        current = applied_plan(target)
        if current is not None and plan_id(current) == plan_id(plan):
            self.check_base(target, meta, current)
            redo = not layers.installed(target)
            self.prepare(pl_module, plan=plan)
            return redo
        if current is not None and is_sharded(target):
            raise CheckpointError(
                "this checkpoint was trained with another S2 plan than the one this sharded model was prepared with; "
                "a sharded model cannot be re-permuted: resume with plan_path=<the run's s2_plan.json>"
            )
        before = self.plan
        try:
            with transaction(target, "adopting the checkpoint's S2 plan", S2State):
                if current is not None:  # prepared with another plan: back to the stock base first
                    if layers.installed(target):
                        layers.uninstall(target, merge=False)
                    unapply_plan(target, verify=False)
                self.check_base(target, meta, plan)
                self.prepare(pl_module, plan=plan)
        except BaseException:
            self.plan = before
            raise
        return True

    def write_provenance(self, out_dir: str | os.PathLike) -> None:
        """``s2_plan.json`` and ``s2_config.json`` in ``out_dir``."""
        if self.plan is None:
            return
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.plan.save(out / "s2_plan.json")
        (out / "s2_config.json").write_text(json.dumps(self.config.to_dict(), indent=1))


def read_metadata(checkpoint: dict) -> dict:
    """``checkpoint["s2ft"]``, validated."""
    meta = checkpoint.get(CHECKPOINT_KEY)
    if not isinstance(meta, dict) or "plan" not in meta:
        raise CheckpointError(
            "this checkpoint has no S²FT section (checkpoint['s2ft']); it was not written by S2FTModule or the "
            "S2FT callback of this version"
        )
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"S²FT checkpoint format {meta.get('format')} is not supported (expected 1)")
    return meta


def load_checkpoint(pl_module: nn.Module, path: str | os.PathLike, *, strict: bool = True) -> nn.Module:
    """Restore an S²FT checkpoint into a freshly built LightningModule (the path for user modules).

    ``pl_module`` is constructed as for training (its Hugging Face base is built in ``__init__`` or
    ``configure_model``); the checkpoint's plan is applied to the submodule it names, its base is checked, and
    the trained state is loaded with strict key checking. `S2FTModule` also loads with Lightning's
    ``load_from_checkpoint``.
    """
    from lightning.fabric.utilities.cloud_io import _load

    checkpoint = _load(path, map_location="cpu", weights_only=True)
    meta = read_metadata(checkpoint)
    if _submodule(pl_module, meta["submodule"]) is None and hasattr(pl_module, "configure_model"):
        pl_module.configure_model()
    config = S2Config(**meta["config"])
    attachment = attachment_of(pl_module) or S2Attachment(config, submodule=meta["submodule"])
    attachment.reconcile(pl_module, checkpoint)
    pl_module.load_state_dict(checkpoint["state_dict"], strict=strict)
    return pl_module


def _train_loader(pl_module: nn.Module, trainer: Any) -> Iterable | None:
    if trainer is None:
        return None
    dm = getattr(trainer, "datamodule", None)
    if dm is not None:
        dm.setup("fit")
        return dm.train_dataloader()
    source = getattr(getattr(trainer, "fit_loop", None), "_data_source", None)
    if source is not None and source.is_defined():
        return source.dataloader()
    return None


def _attach_to(pl_module: nn.Module, attachment: S2Attachment | None) -> None:
    if attachment is None:
        pl_module.__dict__.pop(_ATTR, None)
    else:
        pl_module.__dict__[_ATTR] = attachment


# ---- state-dict hooks on the LightningModule -------------------------------------------------------------
# A state dict taken from the LightningModule (what Lightning checkpoints) is the "split" form cut to what
# trains inside the target; one taken from the Hugging Face model itself stays the stock "merged" form. The
# hooks find what they need in the module's attachment.
def _target_prefix(module: nn.Module) -> str:
    att = attachment_of(module)
    return f"{att.submodule}." if att is not None and att.submodule else ""


def _root_state_dict_pre(module: nn.Module, prefix: str, keep_vars: bool) -> None:
    att = attachment_of(module)
    if att is not None:
        att._form_tokens.append(set_form("split") if current_form() == "merged" else None)


def _root_state_dict_post(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    att = attachment_of(module)
    token = att._form_tokens.pop() if att is not None and att._form_tokens else None
    if token is None:  # inside an explicit state_dict_form: leave the dict whole
        return
    reset_form(token)
    trainable = {prefix + n for n, p in module.named_parameters() if p.requires_grad}
    cut = prefix + _target_prefix(module)
    for key in [k for k in state_dict if k.startswith(cut) and k not in trainable]:
        del state_dict[key]


def _frozen_target_keys(module: nn.Module, target_prefix: str) -> set[str]:
    target = module.get_submodule(target_prefix[:-1]) if target_prefix else module
    trainable = {n for n, p in target.named_parameters() if p.requires_grad}
    with layers.state_dict_form("split"):
        keys = target.state_dict(keep_vars=True).keys()
    return {target_prefix + k for k in keys if k not in trainable}


def _root_load_pre(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """Refuse trainable entries that do not fit the prepared plan, with the fix, before torch's size errors."""
    att = attachment_of(module)
    if att is None:
        return
    target_prefix = _target_prefix(module)
    target = module.get_submodule(target_prefix[:-1]) if target_prefix else module
    ours = {
        prefix + target_prefix + n: p for n, p in target.named_parameters() if n.rsplit(".", 1)[-1].startswith("delta_")
    }
    theirs = {
        k for k in state_dict if k.startswith(prefix + target_prefix) and k.rsplit(".", 1)[-1].startswith("delta_")
    }
    bad = sorted(k for k in theirs if k not in ours or tuple(state_dict[k].shape) != tuple(ours[k].shape))
    if theirs and bad:
        raise CheckpointError(
            f"the S2 deltas in this state dict do not fit the plan this model was prepared with (e.g. {bad[0]}); "
            "it was trained with another plan. Load it with the plan saved beside it (plan_path=.../s2_plan.json) "
            "or through s2ft_lightning.load_checkpoint, which applies the checkpoint's own plan"
        )
    att._load_prefix = prefix


def _root_load_post(module: nn.Module, incompatible_keys) -> None:
    """A trainable-only dict: the frozen target keys are not missing, they are the base the model holds."""
    att = attachment_of(module)
    if att is None:
        return
    prefix, att._load_prefix = att._load_prefix, ""
    frozen = {prefix + k for k in _frozen_target_keys(module, _target_prefix(module))}
    missing = incompatible_keys.missing_keys
    if frozen and frozen <= set(missing):
        missing[:] = [k for k in missing if k not in frozen]


__all__ = [
    "CHECKPOINT_KEY",
    "CheckpointError",
    "S2Attachment",
    "attachment_of",
    "load_checkpoint",
    "read_metadata",
]

"""`S2FTModule`: fine-tune a Hugging Face model with S²FT as an ordinary LightningModule."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from s2ft_lightning.pipeline import S2Config, applied_plan, prepare_model
from surgery.plan import PlanError, S2Plan


def _default_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)


class S2FTModule(L.LightningModule):
    """Loads ``model`` (HF folder, ``.gguf`` file or ``demo:smollm2``), applies S²FT in
    `configure_model`, and trains only the selected blocks.

    Optimizer and scheduler are callables (LightningCLI ``auto_configure_optimizers=False``) because
    the trainable parameters exist only after surgery.
    """

    def __init__(
        self,
        model: str,
        task: Literal["causal_lm", "sequence_classification"] = "causal_lm",
        s2: S2Config | None = None,
        optimizer: OptimizerCallable = _default_optimizer,
        scheduler: LRSchedulerCallable | None = None,
        dtype: Literal["fp32", "bf16", "fp16"] = "fp32",
        num_labels: int | None = None,
        gradient_checkpointing: bool = False,
        plan_path: str | None = None,
        calibration_batches: int = 4,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "s2"])
        self.model_name = model
        self.task = task
        self.s2 = s2 or S2Config()
        # Plain dict so checkpoints load with torch.load(weights_only=True).
        self.hparams["s2"] = self.s2.to_dict()
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.dtype_name = dtype
        self.num_labels = num_labels
        self.gradient_checkpointing = gradient_checkpointing
        self.plan_path = plan_path
        self.calibration_batches = calibration_batches
        self.model: nn.Module | None = None
        self.tokenizer = None

    # ---- surgery -----------------------------------------------------------------------------
    @property
    def plan(self) -> S2Plan | None:
        return None if self.model is None else applied_plan(self.model)

    def configure_model(self) -> None:
        """Load the base and apply S²FT; Lightning calls this on every stage, so it is idempotent."""
        if self.model is not None and self.plan is not None:
            return
        from s2ft_lightning.models import load_model, resolve_dtype

        if self.model is None:
            self.model, self.tokenizer = load_model(
                self.model_name, task=self.task, dtype=resolve_dtype(self.dtype_name), num_labels=self.num_labels
            )
        plan = S2Plan.load(self.plan_path) if self.plan_path else None
        prepare_model(self.model, self.s2, plan=plan, calibration=self._calibration())
        if self.task == "sequence_classification":
            # The classification head is new (random) for the task: it trains fully, like PEFT's modules_to_save.
            head = next((getattr(self.model, n) for n in ("score", "classifier") if hasattr(self.model, n)), None)
            if head is None:
                raise ValueError(f"{type(self.model).__name__} has no 'score' or 'classifier' head to train")
            for p in head.parameters():
                p.requires_grad_(True)
        self.model.train()  # from_pretrained returns eval mode; Lightning keeps modes as it finds them
        if self.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            # Frozen embeddings give no grad; checkpointed blocks still need their inputs to require it.
            self.model.enable_input_require_grads()

    def _calibration(self) -> list[dict] | None:
        if self.s2.strategy == "random":
            return None
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None:
            raise ValueError(
                f"strategy {self.s2.strategy!r} needs calibration batches; pass a datamodule to the trainer "
                "or use strategy 'random'"
            )
        dm.setup("fit")
        batches = []
        for i, batch in enumerate(dm.train_dataloader()):
            if i >= self.calibration_batches:
                break
            batches.append({k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")})
        return batches

    # ---- steps -------------------------------------------------------------------------------
    def forward(self, **batch: Any) -> Any:
        return self.model(**batch)

    def _shared_step(self, batch: dict, stage: str) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
        out = self.model(**inputs)
        loss = out.loss
        bs = inputs["input_ids"].shape[0]
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=bs, sync_dist=stage != "train")
        if self.task == "causal_lm":
            self.log(f"{stage}/ppl", torch.exp(loss.detach().float().clamp(max=50)), batch_size=bs)
            if stage != "train":
                labels = inputs["labels"][:, 1:]
                mask = labels != -100
                pred = out.logits[:, :-1].argmax(-1)
                acc = ((pred == labels) & mask).sum() / mask.sum().clamp(min=1)
                self.log(f"{stage}/token_acc", acc, batch_size=bs, sync_dist=True)
        else:
            acc = (out.logits.argmax(-1) == inputs["labels"]).float().mean()
            self.log(f"{stage}/acc", acc, prog_bar=True, batch_size=bs, sync_dist=stage != "train")
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "test")

    def predict_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        return self.model(**inputs).logits.argmax(-1)

    # ---- optimization ------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError("S2FTModule has no trainable parameters: configure_model did not run")
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        if getattr(scheduler, "needs_total_steps", False):
            scheduler.set_total_steps(int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- provenance and resume ---------------------------------------------------------------
    def on_fit_start(self) -> None:
        out = Path(self.trainer.log_dir or self.trainer.default_root_dir)  # a collective call: every rank
        if self.trainer.is_global_zero and self.plan is not None:
            out.mkdir(parents=True, exist_ok=True)
            self.plan.save(out / "s2_plan.json")
            (out / "s2_config.json").write_text(json.dumps(self.s2.to_dict(), indent=1))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.plan is not None:
            checkpoint["s2ft_plan"] = self.plan.to_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("s2ft_plan")
        if saved is None or self.plan is None:
            return
        mine = self.plan.to_dict()
        if saved["fingerprint"] != mine["fingerprint"] or saved["slices"] != mine["slices"]:
            raise PlanError(
                "checkpoint was trained with a different S2 plan than this module applied "
                f"(checkpoint fingerprint {saved['fingerprint']}, {len(saved['slices'])} slices; "
                f"this model {mine['fingerprint']}, {len(mine['slices'])} slices). Use the same s2 "
                "settings and seed, or set plan_path to the plan saved with the checkpoint."
            )


class WarmupLinear(torch.optim.lr_scheduler.LambdaLR):
    """Linear warmup then linear decay to 0 (the paper's schedule); total steps come from the trainer."""

    needs_total_steps = True

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int = 100, total_steps: int | None = None):
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        super().__init__(optimizer, self._factor)
        self.needs_total_steps = total_steps is None

    def set_total_steps(self, total: int) -> None:
        self.total_steps = total if total and math.isfinite(total) else None

    def _factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / max(1, self.warmup_steps)
        if not self.total_steps:
            return 1.0
        return max(0.0, (self.total_steps - step) / max(1, self.total_steps - self.warmup_steps))

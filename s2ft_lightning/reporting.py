"""Callbacks that measure and report a run: held-out accuracy, the loss curve, step lines, the end summary,
progress bars whose total is the run's.

Every run writes into its own directory, the logger's versioned one (`run_dir`), so runs never overwrite
each other; `RunSummary` names what was written and points ``<logger dir>/latest`` at the newest run.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, RichProgressBar, TQDMProgressBar

log = logging.getLogger(__name__)


def run_dir(trainer: L.Trainer) -> Path:
    """This run's directory: the logger's versioned folder, else ``default_root_dir``.

    ``trainer.log_dir`` is a collective under DDP: call this on every rank.
    """
    return Path(trainer.log_dir or trainer.default_root_dir)


class HeldOutAccuracy(Callback):
    """Generate answers for a held-out split before and after fit and score them with the task's scorer.

    Works with any datamodule that has ``evaluate(model, split, max_new_tokens=, batch_size=)``
    (e.g. `ReasoningGymDataModule`). Results are logged, printed and written to ``<log_dir>/accuracy.json``.

    Args:
        split: The held-out split to score: "test" or "val".
        max_new_tokens: Tokens generated per answer (greedy).
        batch_size: Prompts generated at once.
        before: Also score the untrained model before fit.
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
        out = run_dir(trainer)  # a collective call: every rank
        if trainer.is_global_zero:
            out.mkdir(parents=True, exist_ok=True)
            path = out / "accuracy.json"
            path.write_text(json.dumps(self.results, indent=1))
            self.written = {"accuracy": path}


class LossCurve(Callback):
    """Record the training loss every step and write a PNG (and CSV) of the curve at fit end.

    Args:
        path: Where the PNG goes (the CSV beside it); default: loss_curve.png in the run's directory.
        smooth: Window of the running mean drawn over the raw loss.
    """

    def __init__(self, path: str | None = None, smooth: int = 10):
        self.path = Path(path) if path else None
        self.smooth = smooth
        self.steps: list[int] = []
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            self.steps.append(trainer.global_step)
            self.losses.append(float(loss.detach()))

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.path is None:
            self.path = run_dir(trainer) / "loss_curve.png"

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
        self.written = {"loss curve": self.path}


class StepLog(Callback):
    """Print a line every ``every_n_steps`` optimizer steps when stdout is not a terminal (logs, CI, nohup).

    A progress bar draws nothing into a file; these lines say how far a run is and how fast it goes.

    Args:
        every_n_steps: Steps between lines (default: the trainer's log_every_n_steps).
        force: Print even when stdout is a terminal.
    """

    def __init__(self, every_n_steps: int | None = None, force: bool = False):
        self.every_n_steps = every_n_steps
        self.force = force

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._active = trainer.is_global_zero and (self.force or not sys.stdout.isatty())
        self._t0, self._step0 = time.perf_counter(), trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        every = self.every_n_steps or trainer.log_every_n_steps or 50
        step = trainer.global_step
        if not self._active or step == self._step0 or step % every:
            return
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        rate = (time.perf_counter() - self._t0) / (step - self._step0)
        total = f"/{trainer.max_steps}" if trainer.max_steps and trainer.max_steps > 0 else ""
        value = f"loss {float(loss.detach()):.4f}  " if loss is not None else ""
        print(f"step {step}{total}  {value}{rate:.2f} s/step", flush=True)


class RunSummary(Callback):
    """After fit, print where this run wrote its adapter, checkpoints, curve and accuracy, and point
    ``<logger dir>/latest`` at this run's directory (so ``.../latest/checkpoints/last.ckpt`` always works).

    Runs in ``teardown``, after every callback's ``on_fit_end`` has written its files.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._dir = run_dir(trainer)  # every rank

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or not trainer.is_global_zero or trainer.interrupted:
            return
        lines = [f"run directory: {self._dir}"]
        for cb in trainer.callbacks:
            for label, path in getattr(cb, "written", {}).items():  # what our callbacks wrote
                lines.append(f"  {label}: {path}")
            if isinstance(cb, ModelCheckpoint) and (cb.last_model_path or cb.best_model_path):
                lines.append(f"  checkpoint: {cb.last_model_path or cb.best_model_path}")
        if latest := point_latest(self._dir):
            lines.append(f"  also at: {latest}")
        print("\n".join(lines), flush=True)


def point_latest(run: Path) -> Path | None:
    """Point ``<logger dir>/latest`` at ``run`` (a logger's ``version_N`` folder); the link, or None when ``run``
    is not a versioned folder or ``latest`` is a real folder (never replaced)."""
    if not run.name.startswith("version_") or not run.exists():
        return None
    latest = run.parent / "latest"
    if latest.exists() and not latest.is_symlink():
        return None
    tmp = latest.with_name(f".latest-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(run.name)
    os.replace(tmp, latest)
    return latest


class _RunLengthTotal:
    """Progress-bar mixin: the training bar's total is what this run will train in this epoch, not the epoch's
    length (a 200-step run over 250-batch epochs ends at 200/200, not 200/250)."""

    _anchor: tuple[int, int] | None = None  # (batches done in the epoch, global step) at a known point

    @property
    def total_train_batches(self) -> int | float:
        total = super().total_train_batches
        trainer = self.trainer
        if self._anchor is None or trainer.max_steps is None or trainer.max_steps < 0 or total == float("inf"):
            return total
        batches, step = self._anchor
        return min(total, batches + max(0, trainer.max_steps - step) * trainer.accumulate_grad_batches)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._anchor = (0, trainer.global_step)
        super().on_train_epoch_start(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._anchor is None:  # resumed mid-epoch: Lightning starts the bar here, without an epoch start
            self._anchor = (batch_idx + 1, trainer.global_step)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


class RunRichProgressBar(_RunLengthTotal, RichProgressBar):
    """Lightning's rich progress bar, its training total the run's."""


class RunTQDMProgressBar(_RunLengthTotal, TQDMProgressBar):
    """Lightning's tqdm progress bar, its training total the run's."""


def use_run_length_bar(trainer: L.Trainer) -> None:
    """Give the trainer's Lightning progress bar its run-length total. The bar keeps its settings: the subclass
    adds methods only, so its class is swapped in place."""
    for cb in trainer.callbacks:
        for lightning_bar, ours in ((RichProgressBar, RunRichProgressBar), (TQDMProgressBar, RunTQDMProgressBar)):
            if type(cb) is lightning_bar:
                cb.__class__ = ours

"""Ctrl-C during fit keeps what was trained; resuming continues it, or says why it would train nothing.

`SaveOnInterrupt` turns the first SIGINT of the training loop into a clean stop after the optimizer step in
flight: it saves the checkpoint (``checkpoints/last.ckpt``) and the adapters of that step, both marked
interrupted, points ``latest`` at the run and prints where they are and how to resume. A second Ctrl-C stops at
once without saving. `check_resume` refuses a checkpoint from which the configured trainer would train nothing.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn

from s2ft_lightning.reporting import point_latest, run_dir

INTERRUPTED_KEY = "s2ft_interrupted"  # in checkpoints and adapter metadata: {"step", "max_steps"}


class ResumeError(ValueError):
    """Resuming from this checkpoint with these trainer settings would train nothing."""


class SaveOnInterrupt(Callback):
    """On Ctrl-C (SIGINT) during fit, finish the optimizer step in flight, then save the checkpoint and every
    `AdapterCheckpoint`'s adapter of that step (marked interrupted) and say where; the fit then ends as
    interrupted (Lightning's exit). A Ctrl-C before training starts stops at once (nothing was trained); one
    during the final evaluation saves the finished training the same way.

    Single-process runs only: with several processes each one sees the signal at a different point, so there
    the usual ``ModelCheckpoint(every_n_train_steps=...)`` is what survives an interrupt.
    """

    def __init__(self) -> None:
        self.saved: dict[str, Path] = {}
        self._phase = "before"  # before / training / after the training loop
        self._pending = False
        self._marker: dict[str, Any] | None = None
        self._previous: Any = None
        self._step_at_batch_start = 0
        self._single = True

    # ---- the signal ----------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._phase, self._pending, self.saved = "before", False, {}  # the same callback may serve several fits

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._phase, self._pending, self.saved = "training", False, {}
        self._single = trainer.world_size == 1
        if self._single and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        self._pending = True
        self._restore_handler()  # a second Ctrl-C interrupts at once
        print(
            "\ninterrupt: stopping after the step in progress and saving it (Ctrl-C again stops at once, unsaved)",
            flush=True,
        )

    def _restore_handler(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Act only once an optimizer step completed (not inside a gradient-accumulation window): the checkpoint is
        # then the state after that step, saved where Lightning's own ModelCheckpoint saves (so resuming is exact).
        if self._pending and trainer.global_step > self._step_at_batch_start:
            self._save(trainer, pl_module)
            raise KeyboardInterrupt

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending and self._phase == "training" and not trainer.sanity_checking:
            self._save(trainer, pl_module)
            raise KeyboardInterrupt

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handler()
        self._phase = "after"
        if self._pending:  # the signal came during the last step: the training is complete, stop before the rest
            self._save(trainer, pl_module)
            raise KeyboardInterrupt

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_handler()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handler()
        fitting = trainer.state.fn == TrainerFn.FITTING
        if self.saved or not fitting or not isinstance(exception, KeyboardInterrupt) or not trainer.is_global_zero:
            return
        if self._phase == "after" and self._single:  # during the final evaluation: the training is complete
            self._save(trainer, pl_module)
        elif self._phase == "before":
            print("interrupted before training started: nothing was trained, nothing saved", flush=True)
        else:
            print(
                f"stopped at step {trainer.global_step} without saving (a second Ctrl-C, or a run over several "
                "processes); checkpoints saved earlier in the run are kept",
                flush=True,
            )

    # ---- saving --------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if self._marker is not None:
            checkpoint[INTERRUPTED_KEY] = dict(self._marker)

    def _save(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from s2ft_lightning.callbacks import AdapterCheckpoint

        run = run_dir(trainer)
        folder = getattr(trainer.checkpoint_callback, "dirpath", None) or run / "checkpoints"
        ckpt = Path(folder) / "last.ckpt"
        if ckpt.is_symlink():  # ModelCheckpoint(save_last="link"): never write through into the linked file
            ckpt.unlink()
        self._marker = {"step": trainer.global_step, "max_steps": trainer.max_steps}
        try:
            trainer.save_checkpoint(ckpt, weights_only=False)
            self.saved["checkpoint"] = ckpt
            for cb in trainer.callbacks:
                if isinstance(cb, AdapterCheckpoint) and cb.dirpath is not None:
                    self.saved[f"adapter {cb.name}"] = cb._write(
                        trainer, pl_module, cb.name, metadata={INTERRUPTED_KEY: dict(self._marker)}
                    )
        finally:
            self._marker = None
        if not trainer.is_global_zero:
            return
        latest = point_latest(run)
        of = f" of {trainer.max_steps}" if trainer.max_steps and trainer.max_steps > 0 else ""
        lines = [f"interrupted at step {trainer.global_step}{of}; saved the training so far (marked interrupted):"]
        lines += [f"  {label}: {path}" for label, path in self.saved.items()]
        if latest is not None:
            lines.append(f"  also at: {latest}")
        lines.append(f"resume: the same command with --ckpt_path {ckpt} (trainer.fit(..., ckpt_path=...))")
        print("\n".join(lines), flush=True)


def check_resume(trainer: L.Trainer, ckpt_path: str | Path) -> None:
    """Raise `ResumeError` when fitting from ``ckpt_path`` would train nothing: the checkpoint already reached
    ``max_steps``, or finished ``max_epochs`` epochs (a run that stops at max_steps finishes its epoch)."""
    if not Path(ckpt_path).is_file():
        return  # a distributed checkpoint (a folder): Lightning reads its progress itself
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    step = int(ckpt.get("global_step", 0))
    progress = ckpt.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).get("current", {})
    epochs = int(progress.get("processed", ckpt.get("epoch", 0)))
    max_steps, max_epochs = trainer.max_steps, trainer.max_epochs
    where = f"checkpoint {ckpt_path} (step {step})"
    if max_steps is not None and max_steps >= 0 and step >= max_steps:
        raise ResumeError(
            f"{where} already reached --trainer.max_steps {max_steps}: resuming would train nothing; pass a larger "
            f"--trainer.max_steps (the total step count, e.g. {step + max(1, step // 4)})"
        )
    if max_epochs is not None and max_epochs >= 0 and epochs >= max_epochs:
        raise ResumeError(
            f"{where} finished epoch {epochs} and --trainer.max_epochs is {max_epochs}: resuming would train "
            f"nothing; pass --trainer.max_epochs {epochs + 1} (or -1 to stop at max_steps only) to train on through "
            "the next, reshuffled epoch"
        )

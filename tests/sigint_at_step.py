"""A callback for CLI tests: sends this process a real SIGINT (as Ctrl-C does) when a training step starts."""

from __future__ import annotations

import os
import signal

from lightning.pytorch.callbacks import Callback


class SigintAtStep(Callback):
    """``os.kill(own pid, SIGINT)`` once, at the start of the batch that would make optimizer step ``step + 1``."""

    def __init__(self, step: int = 2):
        self.step = step
        self.sent = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGINT)

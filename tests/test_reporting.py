"""What a run tells its user: step lines without a terminal, and where every file went at the end."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from s2ft_lightning import AdapterCheckpoint, LossCurve, S2Config, S2FTModule
from s2ft_lightning.data import ReasoningGymDataModule
from s2ft_lightning.reporting import RunSummary, StepLog


def _fit(tiny_llama_dir, root, steps=4):
    dm = ReasoningGymDataModule(
        str(tiny_llama_dir), train_size=32, val_size=0, batch_size=4, max_length=48,
        task_kwargs={"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1, "operators": ["+"]},
    )  # fmt: skip
    module = S2FTModule(str(tiny_llama_dir), s2=S2Config(o_ratio=0.25, d_ratio=0.1, seed=0))
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, log_every_n_steps=2, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=root, logger=CSVLogger(root, name="logs"),
        callbacks=[StepLog(), RunSummary(), AdapterCheckpoint(), LossCurve(),
                   ModelCheckpoint(save_last=True, save_top_k=0)],
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    return trainer


def test_runs_get_their_own_folders_and_the_summary_names_them(tiny_llama_dir, tmp_path, capsys):
    _fit(tiny_llama_dir, tmp_path)
    first = capsys.readouterr().out
    _fit(tiny_llama_dir, tmp_path)
    second = capsys.readouterr().out
    logs = tmp_path / "logs"
    assert sorted(p.name for p in logs.iterdir()) == ["latest", "version_0", "version_1"]
    assert (logs / "latest").resolve() == (logs / "version_1").resolve()
    for version, out in (("version_0", first), ("version_1", second)):
        run = logs / version
        assert (run / "adapter" / "default" / "adapter_config.json").is_file()
        assert (run / "loss_curve.png").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
        assert f"run directory: {run}" in out and f"adapter: {run / 'adapter' / 'default'}" in out
        assert f"checkpoint: {run / 'checkpoints' / 'last.ckpt'}" in out
    # stdout is captured (not a terminal): step lines every log_every_n_steps
    steps = [line for line in second.splitlines() if line.startswith("step ")]
    assert [s.split()[1] for s in steps] == ["2/4", "4/4"] and all("s/step" in s and "loss" in s for s in steps)
    ckpt = torch.load(logs / "latest" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["s2ft"]["plan"]["slices"]

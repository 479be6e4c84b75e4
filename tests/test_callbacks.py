"""The S2FT callback inside a plain user LightningModule that builds its own optimizer."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM

from s2ft_lightning import S2FT, AdapterCheckpoint, S2Config
from s2ft_lightning.data import ReasoningGymDataModule


class UserLM(L.LightningModule):
    """What a user already has: an HF model attribute and a configure_optimizers over self.parameters()."""

    def __init__(self, path):
        super().__init__()
        self.net = AutoModelForCausalLM.from_pretrained(path)

    def training_step(self, batch, batch_idx):
        return self.net(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        ).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)


def _dm(path):
    kwargs = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2, "operators": ["+"]}
    return ReasoningGymDataModule(str(path), task_kwargs=kwargs, train_size=16, val_size=0, batch_size=4, max_length=48)


def _trainer(tmp_path, callbacks, steps=3):
    return L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=callbacks,
    )


def test_s2ft_callback_trains_only_blocks_with_the_users_optimizer(tiny_llama_dir, tmp_path):
    user = UserLM(tiny_llama_dir)
    base = {n: p.detach().clone() for n, p in user.named_parameters()}
    cb = S2FT(submodule="net", s2=S2Config(o_ratio=0.25, d_ratio=0.1, seed=1))
    trainer = _trainer(tmp_path, [cb, AdapterCheckpoint(tmp_path / "ad", every_n_steps=2)])
    trainer.fit(user, datamodule=_dm(tiny_llama_dir))

    blocks = [p for p in user.parameters() if p.requires_grad]
    held = [p for g in trainer.optimizers[0].param_groups for p in g["params"]]
    assert blocks and len(held) == len(blocks) and all(any(p is b for b in blocks) for p in held)
    assert all(float(p.abs().max()) > 0 for p in blocks)  # every delta (zeros at the start) trained
    assert all(p.grad is None for p in user.parameters() if not p.requires_grad)
    # Weight decay and updates reached only blocks: embeddings and norms are bit-identical.
    for name, p in user.named_parameters():
        if "embed" in name or "norm" in name:
            assert torch.equal(p, base[name]), name
    assert (tmp_path / "ad" / "step-2" / "adapter_config.json").is_file()
    assert (tmp_path / "ad" / "default" / "adapter_config.json").is_file()
    assert cb.plan is not None and cb.plan.certificate["passed"]


def test_s2ft_callback_names_a_missing_submodule(tiny_llama_dir, tmp_path):
    user = UserLM(tiny_llama_dir)
    with pytest.raises(ValueError, match="no submodule 'model'.*children are \\['net'\\]"):
        _trainer(tmp_path, [S2FT(submodule="model", s2=S2Config(d_ratio=0.1))]).fit(
            user, datamodule=_dm(tiny_llama_dir)
        )
    assert all(p.requires_grad for p in user.parameters())  # untouched


def test_fsdp1_strategy_is_refused_before_anything_changes(tiny_llama_dir):
    """Lightning's FSDPStrategy runs only on GPUs, so the refusal is checked with its strategy object."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    user = UserLM(tiny_llama_dir)
    before = {n: p.detach().clone() for n, p in user.named_parameters()}
    with pytest.raises(ValueError, match="FSDPStrategy .*ModelParallelStrategy\\(data_parallel_size=N"):
        S2FT(submodule="net", s2=S2Config(d_ratio=0.1)).setup(SimpleNamespace(strategy=FSDPStrategy()), user, "fit")
    assert all(torch.equal(p, before[n]) and p.requires_grad for n, p in user.named_parameters())

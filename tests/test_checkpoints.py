"""Lightning checkpoints hold only what trains and reload everywhere users load them.

S2FTModule and a user's module with the S2FT callback go through one preparation path (s2ft_lightning.attach):
same checkpoint section, same base checks, strict loading; a fresh process reproduces the trained logits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import AutoModelForCausalLM

from s2ft_lightning import S2FT, CheckpointError, S2Config, S2FTModule, load_checkpoint
from s2ft_lightning.data import ReasoningGymDataModule
from s2ft_lightning.layers import installed

S2 = S2Config(o_ratio=0.25, d_ratio=0.1, seed=3)
REPO = Path(__file__).resolve().parents[1]


def _dm(path) -> ReasoningGymDataModule:
    kw = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2, "operators": ["+"]}
    return ReasoningGymDataModule(str(path), task_kwargs=kw, train_size=16, val_size=0, batch_size=4, max_length=48)


def _fit(module, data, tmp_path, steps=2, ckpt_path=None, callbacks=(), epochs=None):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=-1 if epochs else steps,
        max_epochs=epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[ckpt, *callbacks],
    )
    trainer.fit(module, datamodule=_dm(data), ckpt_path=ckpt_path)
    return tmp_path / "ck" / "last.ckpt"


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 10), generator=torch.Generator().manual_seed(0))


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def _trainable_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_s2ftmodule_checkpoint_holds_only_what_trains(tiny_llama_dir, tmp_path, optimizer):
    factory = {
        "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
        "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2),
    }[optimizer]
    module = S2FTModule(str(tiny_llama_dir), s2=S2, optimizer=factory)
    path = _fit(module, tiny_llama_dir, tmp_path)
    ckpt = torch.load(path, weights_only=True)
    trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
    assert set(ckpt["state_dict"]) == set(trainable)  # no frozen base
    for n, p in trainable.items():
        assert torch.equal(ckpt["state_dict"][n], p.detach())
    meta = ckpt["s2ft"]
    assert meta["plan"] == module.plan.to_dict() and meta["base_fingerprint"] and meta["base_values"]
    # blocks + optimizer state (AdamW keeps 2 moments per weight) + the plan; not the 0.3 MB frozen base
    moments = {"sgd": 0, "adamw": 2}[optimizer]
    plan_bytes = len(json.dumps(meta).encode())
    limit = (1 + moments) * _trainable_bytes(module) + plan_bytes + 64 * 1024
    assert path.stat().st_size <= limit, (path.stat().st_size, limit)
    base_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    assert path.stat().st_size < base_bytes


def test_load_from_checkpoint_in_a_fresh_process_reproduces_the_trained_logits(tiny_llama_dir, tmp_path):
    module = S2FTModule(str(tiny_llama_dir), s2=S2, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    path = _fit(module, tiny_llama_dir, tmp_path, steps=3)
    ids = _ids(module.model.config.vocab_size)
    want = _logits(module.model, ids)
    torch.save(ids, tmp_path / "ids.pt")
    script = f"""
import torch
from s2ft_lightning import S2FTModule
m = S2FTModule.load_from_checkpoint({str(path)!r})
m.model.eval()
with torch.no_grad():
    torch.save(m.model(input_ids=torch.load({str(tmp_path / "ids.pt")!r})).logits, {str(tmp_path / "got.pt")!r})
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=tmp_path, timeout=300)
    got = torch.load(tmp_path / "got.pt")
    assert torch.allclose(got, want, atol=1e-6, rtol=1e-6)


class LazyUserLM(L.LightningModule):
    """A user's module in Lightning's lazy pattern: the HF model is built in configure_model."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.net = None

    def configure_model(self):
        if self.net is None:
            self.net = AutoModelForCausalLM.from_pretrained(self.path)

    def training_step(self, batch, batch_idx):
        keys = ("input_ids", "attention_mask", "labels")
        return self.net(**{k: batch[k] for k in keys}).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)


def test_callback_on_a_lazy_user_module_checkpoints_and_reloads_strictly(tiny_llama_dir, tmp_path):
    user = LazyUserLM(str(tiny_llama_dir))
    cb = S2FT(submodule="net", s2=S2)
    path = _fit(user, tiny_llama_dir, tmp_path, steps=3, callbacks=[cb])
    assert cb.plan is not None and installed(user.net)
    assert (tmp_path / "s2_plan.json").is_file()  # provenance, as S2FTModule writes it
    trainable = {n for n, p in user.named_parameters() if p.requires_grad}
    ckpt = torch.load(path, weights_only=True)
    assert set(ckpt["state_dict"]) == trainable and ckpt["s2ft"]["submodule"] == "net"
    ids = _ids(user.net.config.vocab_size)
    want = _logits(user.net, ids)
    # The documented path: build the module as for training, then load the checkpoint (strict keys).
    fresh = load_checkpoint(LazyUserLM(str(tiny_llama_dir)), path)
    assert torch.allclose(_logits(fresh.net, ids), want, atol=1e-6, rtol=1e-6)
    # A stray key is still an error: loading is strict about everything that trains.
    ckpt["state_dict"]["net.lm_head.extra"] = torch.zeros(1)
    torch.save(ckpt, tmp_path / "bad.ckpt")
    with pytest.raises(RuntimeError, match="Unexpected key"):
        load_checkpoint(LazyUserLM(str(tiny_llama_dir)), tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointError, match="no S²FT section"):
        torch.save({"state_dict": {}}, tmp_path / "plain.ckpt")
        load_checkpoint(LazyUserLM(str(tiny_llama_dir)), tmp_path / "plain.ckpt")


def test_callback_resume_continues_like_an_uninterrupted_run(tiny_llama_dir, tmp_path):
    def run(where, epochs, ckpt_path=None):
        L.seed_everything(0 if ckpt_path is None else 123)  # resuming must not depend on the global seed
        user = LazyUserLM(str(tiny_llama_dir))
        cb = S2FT(submodule="net", s2=S2)
        _fit(user, tiny_llama_dir, tmp_path / where, epochs=epochs, ckpt_path=ckpt_path, callbacks=[cb])
        return {n: p.detach().clone() for n, p in user.named_parameters() if p.requires_grad}

    full = run("full", 2)
    first = run("first", 1)
    resumed = run("resumed", 2, ckpt_path=tmp_path / "first" / "ck" / "last.ckpt")
    assert full.keys() == resumed.keys()
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
        assert not torch.equal(full[k], first[k]), k


def test_callback_passes_calibration_batches_to_data_driven_selection(tiny_llama_dir, tmp_path):
    user = LazyUserLM(str(tiny_llama_dir))
    cb = S2FT(submodule="net", s2=S2Config(o_ratio=0.25, d_ratio=0.1, strategy="activation"), calibration_batches=2)
    _fit(user, tiny_llama_dir, tmp_path, steps=1, callbacks=[cb])
    assert cb.plan.settings["strategy"] == "activation" and installed(user.net)

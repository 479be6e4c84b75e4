"""S2FTModule end to end on a tiny saved Llama: training touches only blocks, checkpoints, resume, export."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from s2ft_lightning import AdapterCheckpoint, MergeAdapters, S2Config, S2FTModule
from s2ft_lightning.attach import CheckpointError
from s2ft_lightning.data import ReasoningGymDataModule
from s2ft_lightning.layers import installed
from s2ft_lightning.models import ModelLoadError

S2 = S2Config(o_ratio=0.25, d_ratio=0.1, seed=3)


def _dm(path, **kw) -> ReasoningGymDataModule:
    args = dict(
        task="basic_arithmetic",
        task_kwargs={"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2, "operators": ["+"]},
        train_size=16,
        val_size=4,
        batch_size=4,
        max_length=48,
        seed=0,
    )
    args.update(kw)
    return ReasoningGymDataModule(str(path), **args)


def _trainer(tmp_path, **kw) -> L.Trainer:
    args = dict(
        accelerator="cpu",
        devices=1,
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        limit_val_batches=0,
    )
    args.update(kw)
    return L.Trainer(**args)


class _Snapshot(Callback):
    def on_fit_start(self, trainer, pl_module):
        self.before = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


def _sgd(params):
    return torch.optim.SGD(params, lr=0.5)


def test_fit_changes_only_the_deltas(tiny_llama_dir, tmp_path):
    module = S2FTModule(str(tiny_llama_dir), s2=S2)
    snap = _Snapshot()
    _trainer(tmp_path, callbacks=[snap]).fit(module, datamodule=_dm(tiny_llama_dir))
    wrappers = installed(module.model)
    assert wrappers and module.plan is not None and module.plan.certificate["passed"]
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 1)[-1].startswith("delta_") for n in trainable)
    for name, p in module.named_parameters():
        before = snap.before[name]
        if name in trainable:
            assert not torch.equal(before, p), name  # every delta trained
        else:
            assert p.grad is None and torch.equal(p, before), name  # the base is never written


def test_plan_and_config_saved_next_to_logs(tiny_llama_dir, tmp_path):
    module = S2FTModule(str(tiny_llama_dir), s2=S2)
    trainer = _trainer(tmp_path, logger=L.pytorch.loggers.CSVLogger(tmp_path), max_steps=1)
    trainer.fit(module, datamodule=_dm(tiny_llama_dir))
    from surgery.plan import S2Plan

    saved = S2Plan.load(tmp_path / "lightning_logs" / "version_0" / "s2_plan.json")
    assert saved.to_dict() == module.plan.to_dict()


def _block_values(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def test_resume_is_bit_identical(tiny_llama_dir, tmp_path):
    # 16 rows / batch 4 = 4 steps per epoch; stop after epoch 1, resume to epoch 3.
    full = S2FTModule(str(tiny_llama_dir), s2=S2, optimizer=_sgd)
    L.seed_everything(0)
    _trainer(tmp_path / "a", max_steps=-1, max_epochs=3).fit(full, datamodule=_dm(tiny_llama_dir))

    first = S2FTModule(str(tiny_llama_dir), s2=S2, optimizer=_sgd)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    L.seed_everything(0)
    _trainer(tmp_path / "b", max_steps=-1, max_epochs=1, enable_checkpointing=True, callbacks=[ckpt]).fit(
        first, datamodule=_dm(tiny_llama_dir)
    )
    saved = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=False)
    assert saved["s2ft"]["plan"] == first.plan.to_dict()

    resumed = S2FTModule(str(tiny_llama_dir), s2=S2, optimizer=_sgd)
    L.seed_everything(123)  # resume must not depend on the global seed
    _trainer(tmp_path / "c", max_steps=-1, max_epochs=3).fit(
        resumed, datamodule=_dm(tiny_llama_dir), ckpt_path=tmp_path / "ck" / "last.ckpt"
    )
    a, b = _block_values(full), _block_values(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not torch.equal(a[k], _block_values(first)[k])


def test_resume_applies_the_checkpoints_plan_and_refuses_another_base(tiny_llama_dir, tmp_path):
    first = S2FTModule(str(tiny_llama_dir), s2=S2)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    _trainer(tmp_path, max_steps=1, enable_checkpointing=True, callbacks=[ckpt]).fit(
        first, datamodule=_dm(tiny_llama_dir)
    )
    # Another seed selects other heads/channels; resuming adopts the plan the deltas were trained with.
    other = S2FTModule(str(tiny_llama_dir), s2=S2Config(o_ratio=0.25, d_ratio=0.1, seed=4))
    other.configure_model()
    assert other.plan.selected != first.plan.selected
    _trainer(tmp_path, max_steps=1).fit(other, datamodule=_dm(tiny_llama_dir), ckpt_path=tmp_path / "ck" / "last.ckpt")
    assert other.plan.to_dict()["slices"] == first.plan.to_dict()["slices"]
    for (n, a), b in zip(_block_values(other).items(), _block_values(first).values()):
        assert torch.equal(a, b), n  # max_steps=1 was reached already: nothing more trained
    # The same architecture with other weights under the blocks is refused before anything is loaded.
    from transformers import AutoModelForCausalLM

    retrained = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        for p in retrained.parameters():
            p.add_(0.01)
    retrained.save_pretrained(tmp_path / "other_base")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "other_base" / f).write_bytes((tiny_llama_dir / f).read_bytes())
    stranger = S2FTModule(str(tmp_path / "other_base"), s2=S2)
    with pytest.raises(CheckpointError, match="base weights under the checkpoint"):
        _trainer(tmp_path, max_steps=2).fit(
            stranger, datamodule=_dm(tiny_llama_dir), ckpt_path=tmp_path / "ck" / "last.ckpt"
        )


def test_gradient_clipping_reaches_the_blocks(tiny_llama_dir, tmp_path):
    def run(clip):
        m = S2FTModule(str(tiny_llama_dir), s2=S2, optimizer=_sgd)
        snap = _Snapshot()
        L.seed_everything(0)
        _trainer(tmp_path, max_steps=1, gradient_clip_val=clip, callbacks=[snap]).fit(m, datamodule=_dm(tiny_llama_dir))
        return max(float((p - snap.before[n]).abs().max()) for n, p in m.named_parameters() if p.requires_grad)

    unclipped, clipped = run(None), run(1e-6)
    assert unclipped > 1e-3
    assert clipped <= 0.5 * 1e-6 * 1.01  # lr * clip norm bounds every element of the update


def test_accumulation_runs_and_steps_once_per_window(tiny_llama_dir, tmp_path):
    m = S2FTModule(str(tiny_llama_dir), s2=S2)
    trainer = _trainer(tmp_path, max_steps=2, accumulate_grad_batches=2)
    trainer.fit(m, datamodule=_dm(tiny_llama_dir))
    assert trainer.global_step == 2 and trainer.fit_loop.epoch_loop.batch_progress.total.completed == 4


def test_adapter_and_merged_export(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from s2ft_lightning.adapters import load_adapter

    module = S2FTModule(str(tiny_llama_dir), s2=S2)
    callbacks = [AdapterCheckpoint(tmp_path / "adapters"), MergeAdapters(tmp_path / "merged")]
    _trainer(tmp_path, max_steps=2, callbacks=callbacks).fit(module, datamodule=_dm(tiny_llama_dir))
    adapter = load_adapter(tmp_path / "adapters" / "default")
    assert adapter.num_params == sum(p.numel() for p in module.parameters() if p.requires_grad)

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    ids = torch.randint(0, merged.config.vocab_size, (2, 12))
    module.model.eval()
    with torch.no_grad():
        want = module.model(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # Unpermuted: apart from the trained rows/columns (original indices), every weight equals the stock base.
    base_sd, merged_sd = base.state_dict(), merged.state_dict()
    touched = {f"{b.module}.weight" for b in adapter.blocks}
    for name, t in base_sd.items():
        if name not in touched:
            assert torch.equal(t, merged_sd[name]), name


def test_missing_model_path_is_a_clear_error_at_construction(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        S2FTModule(str(tmp_path / "nope"), s2=S2)


def test_ratios_selecting_nothing_are_refused():
    with pytest.raises(ValueError, match="nothing would be trained"):
        S2Config(o_ratio=0.0, d_ratio=0.0)
    with pytest.raises(ValueError, match=r"d_ratio=1.5 is outside \[0, 1\)"):
        S2Config(d_ratio=1.5)


def test_configure_model_is_idempotent(tiny_llama_dir):
    module = S2FTModule(str(tiny_llama_dir), s2=S2)
    module.configure_model()
    plan, n = module.plan, len(installed(module.model))
    module.configure_model()
    assert module.plan is plan and len(installed(module.model)) == n


def test_sequence_classification_trains_blocks(tiny_llama_dir, tmp_path):
    module = S2FTModule(str(tiny_llama_dir), task="sequence_classification", num_labels=3, s2=S2)
    module.configure_model()
    assert module.plan.certificate["passed"]
    ids = torch.randint(3, 200, (4, 10))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 2, 1])}
    loss = module.training_step(batch, 0)
    loss.backward()
    grads = [p.grad for p in module.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)
    assert module.model.score.weight.grad is not None  # the new task head trains fully


def _one_step_grads(module, batch) -> dict[str, torch.Tensor]:
    module.configure_model()
    module.training_step(batch, 0).backward()
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}


def test_gradient_checkpointing_gives_the_same_block_grads(tiny_llama_dir):
    ids = torch.randint(3, 200, (2, 12))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    plain = _one_step_grads(S2FTModule(str(tiny_llama_dir), s2=S2), batch)
    ckpt = _one_step_grads(S2FTModule(str(tiny_llama_dir), s2=S2, gradient_checkpointing=True), batch)
    assert plain.keys() == ckpt.keys() and plain
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-5, atol=1e-7)


def test_data_driven_selection_uses_calibration_batches(tiny_llama_dir, tmp_path):
    s2 = S2Config(o_ratio=0.25, d_ratio=0.1, strategy="weight_activation", seed=3)
    module = S2FTModule(str(tiny_llama_dir), s2=s2, calibration_batches=2)
    _trainer(tmp_path, max_steps=1).fit(module, datamodule=_dm(tiny_llama_dir))
    # The selection is the one the first two training batches score: redo it by hand on a fresh base.
    from transformers import AutoModelForCausalLM

    from surgery.planner import make_plan

    dm = _dm(tiny_llama_dir)
    dm.setup("fit")
    keys = ("input_ids", "attention_mask", "labels")
    batches = [{k: b[k] for k in keys} for b, _ in zip(dm.train_dataloader(), range(2))]
    expected = make_plan(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), config=s2, calibration=batches)
    assert module.plan.selected == expected.selected
    random_plan = make_plan(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), o_ratio=0.25, d_ratio=0.1, seed=3)
    assert module.plan.selected != random_plan.selected  # the data decided, not the seed
    # Without a trainer there is no data to score on: configure_model loads the base and waits.
    waiting = S2FTModule(str(tiny_llama_dir), s2=s2)
    waiting.configure_model()
    assert waiting.model is not None and waiting.plan is None
    # Plain train_dataloaders (no datamodule) are calibration data too.
    dm = _dm(tiny_llama_dir)
    dm.setup("fit")
    _trainer(tmp_path, max_steps=1).fit(waiting, train_dataloaders=dm.train_dataloader())
    assert waiting.plan is not None and waiting.plan.settings["strategy"] == "weight_activation"

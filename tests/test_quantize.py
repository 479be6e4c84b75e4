"""Quantized frozen bases (torchao int8 weight-only and NF4) under trainable S2 deltas."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

pytest.importorskip("torchao")

from benchmarks.tiny_models import perturb  # noqa: E402
from s2ft_lightning import S2Config, extract_adapter, merge_adapter, merged_copy, prepare_model  # noqa: E402
from s2ft_lightning.layers import block_parameters, installed  # noqa: E402
from s2ft_lightning.ops import gather_runs  # noqa: E402
from s2ft_lightning.quantize import dense, is_quantized, quantize_base, weight_bytes  # noqa: E402
from surgery.plan import S2Plan  # noqa: E402

S2 = S2Config(o_ratio=0.25, v_ratio=0.5, d_ratio=0.1, u_ratio=0.05, seed=1)


def _base(dtype=torch.float32, seed: int = 0) -> transformers.LlamaForCausalLM:
    cfg = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=64, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(seed)
    return perturb(transformers.LlamaForCausalLM(cfg), seed).to(dtype).eval()


def _ids(seed=0):
    return torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_block_gradients_equal_the_dequantized_reference(mode):
    model = _base()
    plan = prepare_model(model, S2)
    assert quantize_base(model, mode) > 0
    assert all(is_quantized(w.weight) for w in installed(model).values())
    # Reference: the same permuted model with plain weights holding the dequantized values.
    ref = _base()
    prepare_model(ref, S2, plan=S2Plan.from_dict(plan.to_dict()))
    with torch.no_grad():
        for (_name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
            q.copy_(dense(p).float())
    for p in [*block_parameters(model), *block_parameters(ref)]:
        torch.nn.init.normal_(p, std=0.02)
    with torch.no_grad():
        for p, q in zip(block_parameters(model), block_parameters(ref)):
            q.copy_(p)
    ids = _ids()
    model(ids, labels=ids).loss.backward()
    ref(ids, labels=ids).loss.backward()
    for p, q in zip(block_parameters(model), block_parameters(ref)):
        assert p.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5)


def test_nf4_base_trains_and_its_adapter_applies_to_the_unquantized_base():
    model = _base(torch.bfloat16)
    plan = prepare_model(model, S2)
    quantize_base(model, "nf4")
    opt = torch.optim.AdamW(block_parameters(model), lr=1e-2)
    losses = []
    for step in range(4):
        ids = _ids(step)
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    adapter = extract_adapter(model, plan)  # base checks hash the original (pre-quantization) values
    stock = _base(torch.bfloat16)
    merge_adapter(stock, adapter)  # accepted by the unquantized base
    with torch.no_grad():
        live, applied = model(_ids(9)).logits.float(), stock(_ids(9)).logits.float()
    rel = float((live - applied).abs().max() / applied.abs().max())
    assert rel < 0.25  # the difference is the NF4 rounding of the base (reported in the README)


def test_merged_export_dequantizes_and_adds_exactly():
    model = _base()
    plan = prepare_model(model, S2)
    quantize_base(model, "nf4")
    for p in block_parameters(model):
        torch.nn.init.normal_(p, std=0.05)
    dequantized = {n: dense(p).clone() for n, p in model.named_parameters() if not p.requires_grad}
    wrappers = {n: w for n, w in installed(model).items()}
    out = merged_copy(model)
    assert not any(is_quantized(p) for p in out.parameters())
    assert all(is_quantized(w.weight) for w in wrappers.values())  # the live model is untouched
    # In the unpermuted copy, re-permute to compare block positions: merge the adapter into the dequantized base.
    ref = _base()
    with torch.no_grad():
        from surgery.planner import unapply_plan

        tmp = _base()
        prepare_model(tmp, S2, plan=S2Plan.from_dict(plan.to_dict()))
        for n, p in tmp.named_parameters():
            if n in dequantized:
                p.copy_(dequantized[n])
        from s2ft_lightning.layers import uninstall

        uninstall(tmp, merge=False)
        unapply_plan(tmp)
        ref.load_state_dict(tmp.state_dict())
    merge_adapter(ref, extract_adapter(model, plan), verify=False)  # fp32 add + one cast, as the export
    for (n, a), b in zip(out.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), n
    for name, w in wrappers.items():
        for i, (feature, runs) in enumerate(w.specs):
            block = gather_runs(w.merged_weight(), runs, 0 if feature == "out" else 1)
            want = gather_runs(dequantized[f"{name}.weight"], runs, 0 if feature == "out" else 1) + w.deltas[i]
            assert torch.equal(block, want.detach())


def test_weight_bytes_per_storage():
    sizes = {}
    for mode in ("none", "int8", "nf4"):
        m = _base(torch.bfloat16).requires_grad_(False)
        if mode != "none":
            quantize_base(m, mode)
        sizes[mode] = weight_bytes(m)
    frozen_linear = sum(p.numel() for n, p in _base().named_parameters() if "layers." in n and p.dim() == 2)
    # Only the decoder's linear weights are quantized (embeddings and head stay bf16).
    saved_nf4 = sizes["none"] - sizes["nf4"]
    assert saved_nf4 >= frozen_linear * 2 * 0.7  # NF4: 4 bits + scales per weight, vs 16 bits
    assert sizes["nf4"] < sizes["int8"] < sizes["none"]


def test_refusals():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=96))
    gpt2.requires_grad_(False)
    with pytest.raises(ValueError, match="Conv1D"):
        quantize_base(gpt2, "nf4")
    model = _base()
    with pytest.raises(ValueError, match="no frozen linear weights"):
        quantize_base(model, "nf4")
    quantize_base(model.requires_grad_(False), "int8")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_base(model, "nf4")
    with pytest.raises(ValueError, match="quantize='fp8'"):
        from s2ft_lightning.quantize import quantize_weight

        quantize_weight(torch.zeros(64, 64), "fp8")


def test_s2ftmodule_with_an_nf4_base_checkpoints_and_reloads(tiny_llama_dir, tmp_path):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from s2ft_lightning import S2FTModule
    from s2ft_lightning.data import ReasoningGymDataModule

    module = S2FTModule(str(tiny_llama_dir), s2=S2Config(o_ratio=0.25, d_ratio=0.1, seed=3), quantize="nf4")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True, save_top_k=0)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, callbacks=[ckpt],
    )  # fmt: skip
    kw = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1, "operators": ["+"]}
    dm = ReasoningGymDataModule(str(tiny_llama_dir), task_kwargs=kw, train_size=8, val_size=0, batch_size=4)
    trainer.fit(module, datamodule=dm)
    assert all(is_quantized(w.weight) for w in installed(module.model).values())
    saved = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=True)
    assert saved["s2ft"]["quantize"] == "nf4" and all("delta_" in k for k in saved["state_dict"])
    again = S2FTModule.load_from_checkpoint(tmp_path / "ck" / "last.ckpt")
    assert all(is_quantized(w.weight) for w in installed(again.model).values())
    ids = torch.randint(3, 100, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(again.model.eval()(ids).logits, module.model.eval()(ids).logits)


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_a_quantized_base_saves_like_any_model(mode, tmp_path):
    """state_dict / save_pretrained of a quantized base hold stock dense tensors (the dequantized base with the
    deltas merged) that a stock from_pretrained loads as the trained function."""
    model = _base()
    prepare_model(model, S2)
    for p in block_parameters(model):
        torch.nn.init.normal_(p, std=0.02)
    quantize_base(model, mode)
    state = model.state_dict()
    assert all(type(v) is torch.Tensor for v in state.values()) and set(state) == set(_base().state_dict())
    model.save_pretrained(tmp_path / "saved")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    ids = _ids(4)
    with torch.no_grad():
        live, stock = model(ids).logits, reloaded(ids).logits
    rel = float((live - stock).abs().max() / live.abs().max())
    # int8: the live product scales after an int8 matmul; NF4: the same dequantized weights (README "Scale")
    assert rel <= {"int8": 1e-4, "nf4": 1e-6}[mode], rel
    other = _base(seed=5)  # and the state dict taken from the live model loads into a stock model the same way
    other.load_state_dict(state)
    with torch.no_grad():
        assert float((other(ids).logits - live).abs().max() / live.abs().max()) <= {"int8": 1e-4, "nf4": 1e-6}[mode]


def test_nf4_weights_deep_copy_exactly_whatever_their_block_count():
    """torchao 0.18 re-quantizes on clone with a scaler block of 256: SmolLM2's 192x576 k/v (1728 blocks) failed
    and every other shape drifted; copies are exact now."""
    from s2ft_lightning.quantize import quantize_weight

    w = torch.nn.Parameter(quantize_weight(torch.randn(192, 576), "nf4"), requires_grad=False)
    copied = copy.deepcopy(w)
    assert torch.equal(dense(copied), dense(w)) and copied.scaler_block_size == w.scaler_block_size
    model = _base()
    prepare_model(model, S2)
    quantize_base(model, "nf4")
    twin = copy.deepcopy(model)
    ids = _ids(2)
    with torch.no_grad():
        assert torch.equal(twin(ids).logits, model(ids).logits)
    assert all(torch.equal(dense(a), dense(b)) for a, b in zip(twin.parameters(), model.parameters()))

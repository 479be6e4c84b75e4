"""Experts in every declared layout train with S²FT (`surgery.expert_storage`): gpt-oss (transposed, gate/up
interleaved per channel, expert biases, clamped SwiGLU), Llama-4 (transposed, inputs pre-scaled by routing, a
shared expert), Aria (transposed) and DBRX (stacked 2-D, one expert per call).

Every tiny model has every parameter and buffer perturbed (expert biases included). For each: block gradients
equal masked full fine-tuning (fp32) on every transformers experts path the family offers, the router's gradient
too, the adapter merged into a fresh stock base gives the trained model, saved forms and adapters round-trip,
PEFT LoRA export and multi-adapter serving reproduce it, and an activation that is not declared stays frozen.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from tiny_models import block_grads_rel, masked_reference, randomize_blocks

from benchmarks.tiny_models import perturb, tiny_model
from s2ft_lightning import layers
from s2ft_lightning.adapters import extract_adapter, load_adapter, merge_adapter, save_adapter
from s2ft_lightning.pipeline import S2Config, prepare_model
from surgery.verify import make_inputs

# gpt-oss with a small clamp limit, so a good share of gate and up values is clamped (see the clamp test)
CONFIGS = {"gpt_oss": {"swiglu_limit": 0.3}, "llama4_text": {}, "aria": {}, "dbrx": {}}
CASES = [
    *[("gpt_oss", impl) for impl in ("eager", "grouped_mm", "batched_mm")],
    *[("aria", impl) for impl in ("eager", "grouped_mm", "batched_mm")],
    ("llama4_text", None),  # its experts module has no transformers experts interface: one forward
    ("dbrx", None),
]
S2 = S2Config(o_ratio=0.5, v_ratio=0.5, u_ratio=0.25, d_ratio=0.25, seed=1)


def _model(model_type: str, impl: str | None = None) -> torch.nn.Module:
    model = perturb(tiny_model(model_type, **CONFIGS[model_type]), seed=1, scale=0.05)
    flagged = [m for m in model.modules() if hasattr(m, "is_transposed")]  # transformers' experts interface
    if impl is not None:  # else the config's default
        assert flagged
        for m in flagged:
            m.config._experts_implementation = impl
    return model


def _loss(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    logits, ids = model(**inputs, use_cache=False).logits, inputs["input_ids"]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _logits(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits


def _prepared(model_type: str, impl: str | None = None, seed: int = 2):
    model = _model(model_type, impl)
    plan = prepare_model(model, S2Config(**{**S2.to_dict(), "seed": seed - 1}))
    assert plan.certificate["passed"]
    randomize_blocks(model, seed)
    return model, plan


def _gradient_gap(model: torch.nn.Module, inputs: dict) -> tuple[float, float, float]:
    """(loss gap, worst block-gradient gap to masked full fine-tuning, worst router-gradient gap), relative."""
    reference = masked_reference(model)
    routers = [n for n, _ in model.named_parameters() if ".router." in n and n.endswith("weight")]
    assert routers
    for n in routers:  # the router trains too here, to compare its gradient
        model.get_parameter(n).requires_grad_(True)
    loss, ref_loss = _loss(model, inputs), _loss(reference, inputs)
    loss.backward()
    ref_loss.backward()
    gap = abs(float(loss.detach()) - float(ref_loss.detach())) / abs(float(ref_loss.detach()))
    router = max(  # DBRX renormalises its top-k weights: its router gradient is ~1e-9, so at least 1e-3 scale
        float((model.get_parameter(n).grad - reference.get_parameter(n).grad).abs().max())
        / max(float(reference.get_parameter(n).grad.abs().max()), 1e-3)
        for n in routers
    )
    return gap, block_grads_rel(model, reference), router


@pytest.mark.parametrize(("model_type", "impl"), CASES, ids=[f"{m}-{i or 'own'}" for m, i in CASES])
def test_experts_in_every_declared_layout_train_exactly(model_type, impl):
    model, plan = _prepared(model_type, impl)
    assert impl is not None or not any(hasattr(m, "is_transposed") for m in model.modules())
    experts = [n for n in layers.installed(model) if "experts." in n and "[" in n]
    assert len(experts) == 2 * 4 * 2  # Up rows and Down columns of every expert of both layers
    assert not [f for f in plan_frozen(model_type) if f.name.endswith("experts")]
    inputs = make_inputs(model, 2, 12, seed=3)
    loss, blocks, router = _gradient_gap(model, inputs)
    assert loss <= 1e-6 and blocks <= 1e-5 and router <= 1e-5
    frozen = [p for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)
    fresh = _model(model_type, impl)
    merge_adapter(fresh, extract_adapter(model, plan))
    want = _logits(model, inputs)
    assert float((_logits(fresh, inputs) - want).abs().max()) <= 1e-6 * float(want.abs().max())


def plan_frozen(model_type: str):
    from surgery.analyze import analyze

    return analyze(_model(model_type, "eager" if model_type in ("gpt_oss", "aria") else None)).frozen


def test_gpt_oss_clamp_sees_base_plus_delta(monkeypatch):
    """With a small limit many trained Up values are clamped; the correction computes the clamped SwiGLU on base
    + delta (exact). Treating it as act(g)·du (linear in the Up delta) gives wrong gradients: the test sees it."""
    import surgery.expert_storage as es

    model, _ = _prepared("gpt_oss", "eager")
    experts = model.model.layers[0].mlp.experts
    seen: list[torch.Tensor] = []
    handle = experts.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach()))
    inputs = make_inputs(model, 2, 12, seed=3)
    _logits(model, inputs)
    handle.remove()
    gate_up = seen[0] @ experts.gate_up_proj[0] + experts.gate_up_proj_bias[0]
    limit = model.config.swiglu_limit
    assert (gate_up[:, ::2] > limit).float().mean() > 0.1 and (gate_up[:, 1::2].abs() > limit).float().mean() > 0.1
    assert max(_gradient_gap(copy.deepcopy(model), inputs)) <= 1e-5

    declared = es._gpt_oss

    def linear(module):
        f = declared(module)
        f.linear_in_up = True  # wrong: the clamp makes h not linear in the Up delta
        return f

    monkeypatch.setitem(es._GATES, "GptOssExperts", linear)
    loss, blocks, _ = _gradient_gap(model, inputs)
    assert loss > 1e-4 and blocks > 1e-3


@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_stored_forms_and_adapters_round_trip(model_type, tmp_path):
    model, plan = _prepared(model_type)
    inputs = make_inputs(model, 2, 12, seed=3)
    want = _logits(model, inputs)
    model.save_pretrained(tmp_path / "merged")  # stock keys, deltas folded into the experts tensors
    keys = set(model.state_dict())
    assert not any("delta_" in k for k in keys)
    stock = type(model).from_pretrained(tmp_path / "merged").eval()
    assert float((_logits(stock, inputs) - want).abs().max()) <= 1e-6 * float(want.abs().max())

    fresh = _model(model_type)
    prepare_model(fresh, plan=plan)
    fresh.load_state_dict(layers.trainable_state_dict(model), strict=False)  # split form (checkpoints)
    torch.testing.assert_close(_logits(fresh, inputs), want, atol=1e-6, rtol=0)
    again = _model(model_type)
    prepare_model(again, plan=plan)
    again.load_state_dict(model.state_dict())  # merged form into a prepared model: differences become deltas
    for name, blocks in layers.installed(model).items():
        for a, b in zip(blocks.deltas, layers.installed(again)[name].deltas):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)

    save_adapter(extract_adapter(model, plan, name="x"), tmp_path / "a")
    base = _model(model_type)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    bank = merge_adapter(base, load_adapter(tmp_path / "a"))
    assert float((_logits(base, inputs) - want).abs().max()) <= 1e-6 * float(want.abs().max())
    bank.unmerge()
    assert all(torch.equal(p, before[n]) for n, p in base.named_parameters())  # bit-exact

    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        torch.testing.assert_close(_logits(clone, inputs), want, atol=0, rtol=0)


@pytest.mark.parametrize("model_type", ["gpt_oss", "llama4_text", "aria"])
def test_expert_adapters_export_as_peft_lora(model_type, tmp_path):
    """PEFT's target_parameters LoRA reproduces the trained model: is_transposed tensors as they are, Llama-4's
    unflagged transposed tensors with each expert's factors transposed."""
    from peft import PeftModel

    from s2ft_lightning.adapters import export_peft_lora

    model, plan = _prepared(model_type)
    inputs = make_inputs(model, 2, 12, seed=3)
    want = _logits(model, inputs)
    adapter = extract_adapter(model, plan)
    ranks = export_peft_lora(adapter, tmp_path / "lora")
    assert any("experts" in k and "[" not in k for k in ranks)
    served = PeftModel.from_pretrained(_model(model_type), tmp_path / "lora").eval()
    torch.testing.assert_close(_logits(served, inputs), want, atol=1e-5 * float(want.abs().max()), rtol=0)
    merged = _model(model_type)
    merge_adapter(merged, adapter)
    unloaded = served.merge_and_unload()
    for n, p in merged.named_parameters():
        torch.testing.assert_close(unloaded.get_parameter(n), p, atol=1e-6, rtol=0)


def test_dbrx_expert_adapters_are_refused_for_peft_by_name(tmp_path):
    from s2ft_lightning.adapters import AdapterError, export_peft_lora

    model, plan = _prepared("dbrx")
    with pytest.raises(AdapterError, match=r"experts.mlp.v1': PEFT cannot serve .* DbrxExperts reads mlp.w1"):
        export_peft_lora(extract_adapter(model, plan), tmp_path / "lora")
    assert not (tmp_path / "lora").exists()


@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_several_adapters_serve_side_by_side_on_these_experts(model_type):
    from s2ft_lightning.adapters import MultiAdapterModel

    adapters, want = {}, {}
    ids = make_inputs(_model(model_type), 1, 12, seed=3)["input_ids"]
    for seed in (2, 3):
        model, plan = _prepared(model_type, seed=seed)
        adapters[f"s{seed}"] = adapter = extract_adapter(model, plan, name=f"s{seed}")
        alone = _model(model_type)
        merge_adapter(alone, adapter)
        want[f"s{seed}"] = _logits(alone, {"input_ids": ids})[0]
    stock = _model(model_type)
    want[None] = _logits(stock, {"input_ids": ids})[0]
    served = MultiAdapterModel(stock, adapters)
    names = ["s3", None, "s2"]
    with torch.no_grad():
        got = served(input_ids=ids.expand(3, -1), adapter_names=names, use_cache=False).logits
    for row, n in enumerate(names):
        torch.testing.assert_close(got[row], want[n], atol=1e-5 * float(want[n].abs().max()), rtol=0)
    served.close()
    torch.testing.assert_close(_logits(stock, {"input_ids": ids})[0], want[None], atol=0, rtol=0)


def test_an_activation_that_is_not_declared_stays_frozen_with_the_reason(monkeypatch):
    from transformers.models.gpt_oss import modeling_gpt_oss as go

    from s2ft_lightning.deltas import S2InstallError
    from s2ft_lightning.experts import check_experts
    from surgery.analyze import analyze
    from surgery.config import SelectionError

    def unclamped(self, gate_up):  # a gate of its own that is not the declared clamped SwiGLU
        gate, up = gate_up[..., ::2], gate_up[..., 1::2]
        return (up + 1) * gate * torch.sigmoid(gate * self.alpha)

    unclamped.__qualname__ = "GptOssExperts._apply_gate"  # even under the declared name: checked by value
    monkeypatch.setattr(go.GptOssExperts, "_apply_gate", unclamped)
    model = _model("gpt_oss", "eager")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    s = analyze(model)
    assert [f.name for f in s.frozen] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert "does not compute the activation declared" in s.frozen[0].reason
    with pytest.raises(SelectionError, match=r"d_ratio=0.25 .*does not compute the activation declared"):
        prepare_model(model, S2Config(d_ratio=0.25))
    with pytest.raises(S2InstallError, match=r"GptOssExperts\): GptOssExperts._apply_gate does not compute"):
        check_experts(model.model.layers[0].mlp.experts, "model.layers.0.mlp.experts")

    monkeypatch.setattr(go.GptOssExperts, "_apply_gate", lambda self, x: x[..., ::2])  # not the declared one
    s = analyze(model)
    assert "is not the GptOssExperts gate whose activation is declared" in s.frozen[0].reason
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert not layers.installed(model)


def test_dbrx_experts_called_differently_fail_loudly(monkeypatch):
    """DBRX's S2 forward reads the expert index from the weight view its caller passes; anything else raises."""
    model, _ = _prepared("dbrx")
    mixed = type(model.transformer.blocks[0].ffn.experts.mlp)  # the S2 class over DbrxExpertGLU
    monkeypatch.setattr(
        mixed, "forward", lambda self, x, w1, v1, w2: super(mixed, self).forward(x, w1.clone(), v1, w2), raising=False
    )
    with pytest.raises(RuntimeError, match="not one expert of it"):
        _logits(model, make_inputs(model, 1, 8, seed=0))


def test_the_privacy_filter_declares_the_same_clamped_gate_on_concatenated_experts():
    """OpenAI's privacy filter (an encoder) has gpt-oss's clamped SwiGLU on concatenated gate/up: declared, checked
    against its _apply_gate, and exact (the loss reads its last hidden state through a fixed projection)."""
    model = perturb(tiny_model("openai_privacy_filter", swiglu_limit=0.3), seed=1, scale=0.05)
    plan = prepare_model(model, S2)
    assert plan.certificate["passed"] and any("experts.gate_up_proj[" in n for n in layers.installed(model))
    g = randomize_blocks(model, 2)
    reference = masked_reference(model)
    ids = make_inputs(model, 2, 12, seed=3)["input_ids"]
    probe = torch.randn(model.config.hidden_size, generator=g)
    for m in (model, reference):
        (m(input_ids=ids).last_hidden_state @ probe).square().mean().backward()
    assert block_grads_rel(model, reference) <= 1e-5
    fresh = perturb(tiny_model("openai_privacy_filter", swiglu_limit=0.3), seed=1, scale=0.05)
    merge_adapter(fresh, extract_adapter(model, plan))
    with torch.no_grad():
        want = model(input_ids=ids).last_hidden_state
        got = fresh(input_ids=ids).last_hidden_state
    assert float((got - want).abs().max()) <= 1e-6 * float(want.abs().max())

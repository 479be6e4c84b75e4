"""S2 blocks on MoE experts stored as 3-D tensors: exact gradients on every transformers experts path,
adapters with the expert index, state-dict forms, training, and the refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import block_grads_rel, masked_reference, randomize_blocks

from benchmarks.tiny_models import tiny_model
from s2ft_lightning import layers
from s2ft_lightning.adapters import AdapterError, extract_adapter, load_adapter, merge_adapter, save_adapter
from s2ft_lightning.pipeline import S2Config, prepare_model

MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
IMPLS = ("eager", "grouped_mm", "batched_mm")
S2 = S2Config(o_ratio=0.25, u_ratio=0.25, d_ratio=0.25, seed=1)
IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def _moe(model_type: str, impl: str = "grouped_mm", **kw) -> torch.nn.Module:
    model = tiny_model(model_type, **kw)
    model.config._experts_implementation = impl  # shared by every experts module of the model
    return model


def _prepared(model_type: str, impl: str = "grouped_mm", seed: int = 2):
    model = _moe(model_type, impl)
    plan = prepare_model(model, S2)
    randomize_blocks(model, seed)
    return model, plan


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("model_type", MOE)
def test_expert_block_gradients_equal_masked_full_fine_tuning(model_type, impl):
    model, _ = _prepared(model_type, impl)
    experts = [n for n in layers.installed(model) if "experts." in n]
    assert len(experts) >= 2 * 4 * 2  # Up rows and Down columns of every expert of both layers
    reference = copy.deepcopy(model)
    layers.uninstall(reference, merge=True)
    routers = [n for n, _ in model.named_parameters() if n.endswith("mlp.gate.weight")]
    for m in (model, reference):
        m.requires_grad_(m is reference)
        for n in routers:  # the router trains too here, to compare its gradient
            m.get_parameter(n).requires_grad_(True)
    for p in layers.block_parameters(model):
        p.requires_grad_(True)
    loss = model(input_ids=IDS, labels=IDS).loss
    ref_loss = reference(input_ids=IDS, labels=IDS).loss
    loss.backward()
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=0)
    assert block_grads_rel(model, reference) <= 1e-5
    for n in routers:
        torch.testing.assert_close(model.get_parameter(n).grad, reference.get_parameter(n).grad, atol=1e-6, rtol=1e-5)
    frozen = [p for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)


def test_global_budget_trains_uneven_experts_exactly(tmp_path):
    """allocation='global' gives experts different channel counts; each still trains exactly, and the PEFT
    LoRA export zero-pads the smaller experts to the tensor's shared rank."""
    from peft import PeftModel

    from s2ft_lightning.adapters import export_peft_lora

    model = _moe("mixtral")
    plan = prepare_model(model, S2Config(d_ratio=0.1, allocation="global", seed=3))
    counts = {}
    for name, blocks in layers.installed(model).items():
        if ".experts." in name:
            counts[name] = sum(d.shape[1] for d in blocks.deltas)
    assert len(set(counts.values())) > 1  # one draw over all experts, not an even share each
    with torch.no_grad():
        for p in layers.block_parameters(model):
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    reference = copy.deepcopy(model)
    layers.uninstall(reference, merge=True)
    model.requires_grad_(False)
    for p in layers.block_parameters(model):
        p.requires_grad_(True)
    model(input_ids=IDS, labels=IDS).loss.backward()
    reference(input_ids=IDS, labels=IDS).loss.backward()
    assert block_grads_rel(model, reference) <= 1e-5
    ranks = export_peft_lora(extract_adapter(model, plan), tmp_path / "lora")
    assert ranks["model.layers.0.mlp.experts.down_proj"] == max(
        counts[f"model.layers.0.mlp.experts.down_proj[{e}]"] for e in range(4)
    )
    served = PeftModel.from_pretrained(_moe("mixtral"), tmp_path / "lora").eval()
    with torch.no_grad():
        torch.testing.assert_close(served(input_ids=IDS).logits, model(input_ids=IDS).logits, atol=1e-5, rtol=0)


def test_an_expert_no_token_reaches_gets_no_update_and_the_rest_stay_exact():
    model, _ = _prepared("qwen3_moe", "eager")
    with torch.no_grad():  # router: expert 3 of layer 0 is never among the top 2
        model.get_parameter("model.layers.0.mlp.gate.weight")[3].fill_(-1e4)
        model.get_parameter("model.layers.0.mlp.gate.weight")[3, 0] = 0.0
    reference = masked_reference(model)
    x = torch.ones(2, 12, dtype=torch.long) * 5  # the same token everywhere: at most 2 experts are hit
    model(input_ids=x, labels=x).loss.backward()
    reference(input_ids=x, labels=x).loss.backward()
    unreached = layers.installed(model)["model.layers.0.mlp.experts.down_proj[3]"]
    assert all(d.grad is None or not d.grad.any() for d in unreached.deltas)
    assert block_grads_rel(model, reference) <= 1e-5


@pytest.mark.parametrize("model_type", MOE)
def test_adapters_carry_the_expert_index_and_merge_exactly_into_a_stock_base(model_type, tmp_path):
    model, plan = _prepared(model_type)
    with torch.no_grad():
        want = model(input_ids=IDS).logits
    adapter = extract_adapter(model, plan, name="moe")
    expert_modules = [m for m in adapter.modules if adapter.module_kinds[m] == "expert"]
    assert "model.layers.0.mlp.experts.down_proj[3]" in expert_modules
    block = adapter.block("model.layers.0.mlp.experts.down_proj[3]", "in")
    # original (stock) channel indices of expert 3
    assert sorted(block.indices) == sorted(plan.selected["model.layers.0.mlp.experts.3"]["down"])
    save_adapter(adapter, tmp_path / "a")
    stock = _moe(model_type)  # unpermuted, never prepared
    before = {n: p.detach().clone() for n, p in stock.named_parameters()}
    bank = merge_adapter(stock, load_adapter(tmp_path / "a"))
    with torch.no_grad():
        torch.testing.assert_close(stock(input_ids=IDS).logits, want, atol=1e-5, rtol=0)
    bank.unmerge()
    assert all(torch.equal(p, before[n]) for n, p in stock.named_parameters())  # bit-exact


def test_stored_forms_round_trip_merged_for_stock_loaders_split_for_checkpoints(tmp_path):
    from transformers import AutoModelForCausalLM

    model, plan = _prepared("olmoe")
    with torch.no_grad():
        want = model(input_ids=IDS).logits
    keys = set(model.state_dict())
    assert "model.layers.0.mlp.experts.down_proj" in keys and not any("delta_" in k for k in keys)
    model.save_pretrained(tmp_path / "merged")  # stock keys, deltas folded into the 3-D weights
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(stock.eval()(input_ids=IDS).logits, want, atol=1e-5, rtol=0)

    trainable = layers.trainable_state_dict(model)
    assert "model.layers.0.mlp.experts.down_proj[3].delta_0" in trainable
    fresh = _moe("olmoe")
    prepare_model(fresh, plan=plan)
    fresh.load_state_dict(trainable, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=IDS).logits, want, atol=1e-6, rtol=0)

    again = _moe("olmoe")
    prepare_model(again, plan=plan)
    again.load_state_dict(model.state_dict())  # merged form into a prepared model: differences become deltas
    for name, blocks in layers.installed(model).items():
        for a, b in zip(blocks.deltas, layers.installed(again)[name].deltas):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    layers.uninstall(again, merge=False)
    base = _moe("olmoe")
    prepare_model(base, plan=plan)
    layers.uninstall(base, merge=False)
    assert all(torch.equal(p, base.get_parameter(n)) for n, p in again.named_parameters())  # base untouched


@pytest.mark.parametrize("model_type", MOE)
def test_a_short_training_run_lowers_the_loss(model_type):
    model = _moe(model_type)
    prepare_model(model, S2Config(d_ratio=0.25, u_ratio=0.25, seed=0))
    opt = torch.optim.AdamW(layers.block_parameters(model), lr=3e-2, fused=True)
    model.train()
    losses = []
    for _ in range(10):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.25, losses


def test_bf16_experts_train_with_fp32_masters():
    model = _moe("mixtral").to(torch.bfloat16)
    prepare_model(model, S2)
    deltas = [d for n, b in layers.installed(model).items() if "experts." in n for d in b.deltas]
    assert deltas and all(d.dtype == torch.float32 for d in deltas)
    model(input_ids=IDS, labels=IDS).loss.backward()
    assert all(d.grad is not None and d.grad.dtype == torch.float32 and torch.isfinite(d.grad).all() for d in deltas)


def test_unsupported_experts_are_refused_before_anything_moves(monkeypatch):
    from s2ft_lightning.layers import S2InstallError
    from surgery.config import SelectionError

    model = _moe("mixtral")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cls = type(model.model.layers[0].mlp.experts)
    from transformers.integrations import moe

    # a gate of the model's own (here computing the default, so the model still runs) is not assumed to be
    # act(gate)·up: refused
    monkeypatch.setattr(cls, "_apply_gate", lambda self, x: moe._default_apply_gate(self, x), raising=False)
    # the analysis already keeps such experts frozen, so the expert ratios are refused at selection, naming why
    with pytest.raises(SelectionError, match=r"u_ratio=0.25 .*MixtralExperts gates with its own"):
        prepare_model(model, S2)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert not layers.installed(model)
    # and installing blocks on them is refused by the expert layer itself (a plan made elsewhere)
    from s2ft_lightning.experts import check_experts

    with pytest.raises(S2InstallError, match=r"mlp.experts' \(MixtralExperts\): MixtralExperts gates with its own"):
        check_experts(model.model.layers[0].mlp.experts, "model.layers.0.mlp.experts")


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_several_expert_adapters_serve_side_by_side_in_one_batch(model_type):
    from s2ft_lightning.adapters import MultiAdapterModel

    adapters, want = {}, {}
    for seed in (2, 3):
        model, plan = _prepared(model_type, seed=seed)
        adapters[f"s{seed}"] = adapter = extract_adapter(model, plan, name=f"s{seed}")
        alone = _moe(model_type)
        merge_adapter(alone, adapter)
        with torch.no_grad():
            want[f"s{seed}"] = alone(input_ids=IDS[:1]).logits[0]
    stock = _moe(model_type)
    with torch.no_grad():
        want[None] = stock(input_ids=IDS[:1]).logits[0]
        served = MultiAdapterModel(stock, adapters)
        names = ["s3", None, "s2"]
        got = served(input_ids=IDS[:1].expand(3, -1), adapter_names=names).logits
    for row, n in enumerate(names):
        torch.testing.assert_close(got[row], want[n], atol=1e-5, rtol=0)
    served.close()
    with torch.no_grad():
        torch.testing.assert_close(stock(input_ids=IDS[:1]).logits[0], want[None], atol=0, rtol=0)


def test_an_installed_moe_model_pickles_and_deep_copies():
    import pickle

    model, _ = _prepared("qwen3_moe")
    with torch.no_grad():
        want = model(input_ids=IDS).logits
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert type(clone.model.layers[0].mlp.experts).__name__ == "S2Qwen3MoeExperts"
        with torch.no_grad():
            torch.testing.assert_close(clone(input_ids=IDS).logits, want, atol=0, rtol=0)


@pytest.mark.parametrize("model_type", MOE)
def test_expert_adapters_export_as_peft_lora_on_the_3d_parameters(model_type, tmp_path):
    """PEFT's target_parameters LoRA serves the exported experts (beside o_proj, and the shared expert)."""
    from peft import PeftModel

    from s2ft_lightning.adapters import export_peft_lora

    model, plan = _prepared(model_type)
    with torch.no_grad():
        want = model(input_ids=IDS).logits
    adapter = extract_adapter(model, plan, name="moe")
    ranks = export_peft_lora(adapter, tmp_path / "lora")
    assert ranks["model.layers.0.mlp.experts.down_proj"] == max(
        len(b.indices) for b in adapter.blocks if b.module.startswith("model.layers.0.mlp.experts.down_proj[")
    )
    served = PeftModel.from_pretrained(_moe(model_type), tmp_path / "lora").eval()
    with torch.no_grad():
        torch.testing.assert_close(served(input_ids=IDS).logits, want, atol=1e-5, rtol=0)
    merged = _moe(model_type)
    merge_adapter(merged, adapter)
    unloaded = served.merge_and_unload()
    for n, p in merged.named_parameters():
        torch.testing.assert_close(unloaded.get_parameter(n), p, atol=1e-6, rtol=0)
    with pytest.raises(AdapterError, match="above --max-rank 1"):
        export_peft_lora(adapter, tmp_path / "capped", max_rank=1)
    assert not (tmp_path / "capped").exists()
    # A second adapter side by side (PEFT wants the same target parameters; it has no mixed batches for them).
    other, other_plan = _prepared(model_type, seed=5)
    with torch.no_grad():
        want_other = other(input_ids=IDS).logits
    export_peft_lora(extract_adapter(other, other_plan), tmp_path / "other")
    both = PeftModel.from_pretrained(_moe(model_type), tmp_path / "lora", adapter_name="a").eval()
    both.load_adapter(tmp_path / "other", adapter_name="b")
    with torch.no_grad():
        for name, logits in (("a", want), ("b", want_other)):
            both.set_adapter(name)
            torch.testing.assert_close(both(input_ids=IDS).logits, logits, atol=1e-5, rtol=0)


def test_lora_export_refuses_expert_parameters_it_cannot_place(tmp_path):
    """PEFT nests one wrapper per 3-D parameter in declaration order: an unknown parameter name is refused."""
    import dataclasses

    from s2ft_lightning.adapters import export_peft_lora

    model, plan = _prepared("mixtral")
    adapter = extract_adapter(model, plan)

    def rename(m: str) -> str:
        return m.replace("experts.gate_up_proj[", "experts.w13[")

    renamed = dataclasses.replace(
        adapter,
        blocks=[dataclasses.replace(b, module=rename(b.module)) for b in adapter.blocks],
        module_shapes={rename(m): s for m, s in adapter.module_shapes.items()},
        module_kinds={rename(m): k for m, k in adapter.module_kinds.items()},
    )
    with pytest.raises(AdapterError, match="knows the expert parameters .* MultiAdapterModel or merge it"):
        export_peft_lora(renamed, tmp_path / "lora")
    assert not (tmp_path / "lora").exists()

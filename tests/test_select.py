"""Selection: budgets per role and layer, every strategy deterministic by seed, bad inputs refused."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import tiny_llama

from benchmarks.tiny_models import tiny_model
from surgery.analyze import analyze
from surgery.select import STRATEGIES, SelectionError, role_level_size, select


def calibration(n: int = 2, vocab: int = 128) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(11)
    return [{"input_ids": torch.randint(0, vocab, (2, 8), generator=g)} for _ in range(n)]


RATIOS = dict(o_ratio=0.5, v_ratio=0.5, u_ratio=0.1, d_ratio=0.2)
ROLE_RATIO = {"o": 0.5, "v": 0.5, "up": 0.1, "down": 0.2}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_even_counts_and_seed_determinism(strategy):
    model = tiny_llama()
    s = analyze(model)
    cal = calibration() if strategy in ("activation", "weight_activation", "gradient") else None
    a = select(model, s, **RATIOS, strategy=strategy, seed=3, calibration=cal)
    b = select(model, s, **RATIOS, strategy=strategy, seed=3, calibration=cal)
    assert a == b
    for c in s.couplings:
        for role in ("o", "v", "up", "down"):
            if not c.by_role(role):
                continue
            n = role_level_size(c, role)
            idx = a[c.name][role]
            assert len(idx) == max(1, math.floor(ROLE_RATIO[role] * n + 0.5))
            assert idx == sorted(set(idx)) and all(0 <= i < n for i in idx)
    assert role_level_size(s["model.layers.0.self_attn"], "v") == 2  # GQA: v is chosen per kv head


def test_random_seed_changes_selection():
    model = tiny_llama()
    s = analyze(model)
    picks = {str(select(model, s, d_ratio=0.25, seed=k)) for k in range(4)}
    assert len(picks) > 1


def test_global_allocation_total_and_determinism():
    model = tiny_llama(num_hidden_layers=2)
    s = analyze(model)
    a = select(model, s, d_ratio=0.1, allocation="global", seed=5)
    assert a == select(model, s, d_ratio=0.1, allocation="global", seed=5)
    total = sum(c.size for c in s.by_kind("ffn"))
    assert sum(len(r["down"]) for r in a.values()) == math.floor(0.1 * total + 0.5)


def test_global_allocation_spreads_one_budget_over_every_expert():
    model = tiny_model("mixtral")
    s = analyze(model)
    a = select(model, s, d_ratio=0.1, allocation="global", seed=3)
    experts = [c for c in s.by_kind("ffn") if ".experts." in c.name]
    assert len(experts) == 2 * 4  # every expert of both layers is one coupling
    assert sum(len(r["down"]) for r in a.values()) == math.floor(0.1 * sum(c.size for c in experts) + 0.5)
    counts = [len(a.get(c.name, {}).get("down", [])) for c in experts]
    assert len(set(counts)) > 1  # spread by one draw over all experts, not an even share each
    assert a == select(model, s, d_ratio=0.1, allocation="global", seed=3)


def test_weight_strategy_matches_column_norms_and_variants():
    model = tiny_llama()
    s = analyze(model)
    large = select(model, s, o_ratio=0.5, strategy="weight", variant="large")
    small = select(model, s, o_ratio=0.5, strategy="weight", variant="small")
    for layer in range(2):
        w = model.get_parameter(f"model.layers.{layer}.self_attn.o_proj.weight").detach()
        norms = w.reshape(w.shape[0], 4, 8).pow(2).sum((0, 2))
        order = torch.argsort(norms, descending=True).tolist()
        name = f"model.layers.{layer}.self_attn"
        assert large[name]["o"] == sorted(order[:2])
        assert small[name]["o"] == sorted(order[2:])


def test_data_strategies_leave_no_trace():
    model = tiny_llama()
    s = analyze(model)
    model.train()
    model.model.layers[0].mlp.down_proj.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for strategy in ("activation", "weight_activation", "gradient"):
        sel = select(model, s, o_ratio=0.25, d_ratio=0.1, strategy=strategy, calibration=calibration())
        assert all(len(r["down"]) == 5 for r in sel.values() if "down" in r)
    assert all(p.grad is None for p in model.parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert model.training and all(m.training for m in model.modules())


def test_gradient_strategy_follows_gradient_magnitude():
    model = tiny_llama()
    s = analyze(model)
    cal = calibration(1)
    sel = select(model, s, d_ratio=0.1, strategy="gradient", calibration=cal)
    batch = cal[0]
    model.zero_grad()
    model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss.backward()
    g = model.get_parameter("model.layers.1.mlp.down_proj.weight").grad.pow(2).sum(0)
    model.zero_grad(set_to_none=True)
    assert sel["model.layers.1.mlp"]["down"] == sorted(torch.argsort(g, descending=True)[:5].tolist())


def test_moe_experts_are_selected_per_expert_with_weight_or_gradient_scores():
    model = tiny_model("qwen2_moe")
    s = analyze(model)
    sel = select(model, s, d_ratio=0.25)
    experts = [n for n in sel if ".experts." in n]
    assert len(experts) == 2 * 4 and any("shared_expert" in n for n in sel)  # every expert of both layers
    assert all(len(sel[n]["down"]) == 6 for n in experts)  # even budget: 25% of 24 channels per expert
    weighted = select(model, s, d_ratio=0.25, strategy="weight")
    w = model.get_parameter("model.layers.0.mlp.experts.down_proj")[2].pow(2).sum(0)  # column norms, expert 2
    assert weighted["model.layers.0.mlp.experts.2"]["down"] == sorted(torch.argsort(w, descending=True)[:6].tolist())
    cal = [torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))]
    assert select(model, s, d_ratio=0.25, strategy="gradient", calibration=cal).keys() == sel.keys()
    with pytest.raises(SelectionError, match="MoE expert weights .* run inside one experts module"):
        select(model, s, d_ratio=0.25, strategy="activation", calibration=cal)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(o_ratio=-0.1), r"o_ratio=-0.1 is outside \[0, 1\)"),
        (dict(d_ratio=1.5), r"d_ratio=1.5 is outside"),
        (dict(u_ratio=1.0), "full fine-tuning"),
        (dict(), "every ratio is 0"),
        (
            dict(d_ratio=0.1, strategy="magic"),
            "valid: random, weight, activation, weight_activation, gradient",
        ),
        (dict(d_ratio=0.1, variant="medium"), "unknown variant"),
        (dict(d_ratio=0.1, allocation="local"), "unknown allocation"),
        (dict(d_ratio=0.1, strategy="activation"), "needs calibration"),
        (dict(d_ratio=0.1, strategy="gradient", calibration=[]), "needs calibration"),
        (dict(v_ratio=0.9), "selects every 'v' unit"),
    ],
)
def test_bad_arguments_refused(kwargs, match):
    model = tiny_llama()
    s = analyze(model)
    with pytest.raises(SelectionError, match=match):
        select(model, s, **kwargs)


def test_bad_calibration_batch_refused():
    model = tiny_llama()
    with pytest.raises(SelectionError, match="input_ids"):
        select(model, analyze(model), d_ratio=0.1, strategy="activation", calibration=[{"ids": 1}])

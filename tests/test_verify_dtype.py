"""Verification that holds in every dtype and on every expert (issue #22; docs/ARCHITECTURE.md, "Verification").

bf16 / fp16 models are checked in fp32 (`surgery.upcast`, block by block) at the fp32 tolerance, and every experts
module a change touches is driven expert by expert (`surgery.expert_check`). The regressions: two swapped Down
columns in the last of 24 bf16 layers and a k bias left behind by its heads passed the old bf16 tolerance; a wrong
move in an expert the 2 x 16 check tokens never reach passed both the probe and verification.
"""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch
from test_transactions import assert_same, whole_state
from tiny_models import tiny_llama

from benchmarks.tiny_models import tiny_model
from s2ft_lightning import S2Config, prepare_model
from surgery.analyze import analyze
from surgery.permute import permute_coupling
from surgery.probe import ProbeError, probe_permutation, probe_structures
from surgery.structures import Coupling
from surgery.upcast import UpcastError, fp32_call
from surgery.verify import VerificationError, compare_logits, logits_of, make_inputs, verify_function

OLD_TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 5e-3}  # what verification allowed before (in the own dtype)


def _swap01(c: Coupling) -> list[int]:
    return [1, 0, *range(2, c.size)]


def _only(c: Coupling, *roles: str) -> Coupling:
    """``c`` as a wrong analysis would read it: only the members of ``roles`` (the rest left behind)."""
    return dataclasses.replace(c, members=tuple(m for m in c.members if m.role in roles))


def _without(c: Coupling, role: str) -> Coupling:
    return dataclasses.replace(c, members=tuple(m for m in c.members if m.role != role))


def _own_dtype_rel(model: torch.nn.Module, change) -> float:
    """The logits difference ``change`` makes measured in the model's own dtype (as the old check did); undone."""
    inputs = make_inputs(model, 2, 16, 0)
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        before = logits_of(model(**inputs)).double()
        change()
        after = logits_of(model(**inputs)).double()
        for n, p in model.named_parameters():
            p.copy_(snapshot[n])
    return compare_logits(before, after, 0.0).rel_diff


def test_swapped_down_columns_in_the_last_of_24_bf16_layers_fail_verification():
    model = tiny_llama(num_hidden_layers=24).to(torch.bfloat16)
    last = analyze(model, cross_check=False, probe=False)["model.layers.23.mlp"]
    down_only = _only(last, "down")  # Down columns moved without their gate / up rows
    own = _own_dtype_rel(model, lambda: permute_coupling(model, down_only, _swap01(last)))
    assert 1e-3 < own < OLD_TOLERANCE[torch.bfloat16]  # a real change the old bf16 check passed
    before = whole_state(model)
    with pytest.raises(VerificationError, match=r"computed in float32 for a bfloat16 model"):
        verify_function(model, lambda: permute_coupling(model, down_only, _swap01(last)), journaled=True)
    assert_same(model, before)


def test_a_k_bias_left_behind_by_its_heads_fails_the_probe_and_verification_in_bf16():
    model = tiny_model("qwen2").to(torch.bfloat16)  # biases on q, k, v (perturbed)
    s = analyze(model, cross_check=False)
    heads = s["model.layers.1.self_attn"]
    wrong = _without(heads, "k_bias")
    own = _own_dtype_rel(model, lambda: permute_coupling(model, wrong, probe_permutation(heads)))
    assert own < OLD_TOLERANCE[torch.bfloat16]  # the old bf16 check passed it
    bad = dataclasses.replace(s, couplings=[wrong if c is heads else c for c in s.couplings])
    before = whole_state(model)
    with pytest.raises(ProbeError, match=r"layer 1 heads coupling 'model.layers.1.self_attn'"):
        probe_structures(model, bad)
    assert_same(model, before)
    with pytest.raises(VerificationError, match="function"):
        verify_function(model, lambda: permute_coupling(model, wrong, probe_permutation(heads)), journaled=True)
    assert_same(model, before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("model_type", ["llama", "qwen2_moe"])
def test_correct_plans_pass_in_low_precision_at_the_fp32_tolerance(model_type, dtype):
    kw = dict(num_key_value_heads=2, attention_bias=True, mlp_bias=True) if model_type == "llama" else {}
    model = tiny_model(model_type, **kw).to(dtype)
    assert any(n.startswith("probe: all") for n in analyze(model).notes)  # the probe passes in low precision
    plan = prepare_model(model, S2Config(o_ratio=0.5, v_ratio=0.5, u_ratio=0.25, d_ratio=0.25, seed=1))
    cert = plan.certificate
    assert cert["passed"] and (cert["dtype"], cert["check_dtype"], cert["tolerance"]) == (
        str(dtype)[6:],
        "float32",
        1e-4,
    )
    assert cert["rel_diff"] < 1e-5 and cert["experts_rel_diff"] < 1e-5  # measured: ~1e-7
    assert cert["experts_checked"] == (8 if model_type == "qwen2_moe" else 0) and cert["experts_not_driven"] == []
    assert {p.dtype for n, p in model.named_parameters() if "delta" not in n} == {dtype}


def _reached_experts(model: torch.nn.Module, path: str) -> set[int]:
    """The experts the check's 2 x 16 tokens are routed to in the experts module ``path``."""
    hit: set[int] = set()
    handle = model.get_submodule(path).register_forward_hook(
        lambda m, args, out: hit.update(args[1].flatten().tolist())
    )
    try:
        with torch.no_grad():
            model(**make_inputs(model, 2, 16, 0))
    finally:
        handle.remove()
    return hit


def test_a_wrong_move_in_an_unreached_expert_fails_naming_the_expert():
    model = tiny_model("qwen2_moe", num_experts=64, num_experts_per_tok=2).to(torch.bfloat16)
    s = analyze(model, cross_check=False)
    path = "model.layers.1.mlp.experts"
    e = min(set(range(64)) - _reached_experts(model, path))
    wrong = _only(s[f"{path}.{e}"], "down")  # its Down columns move, its gate/up rows do not
    before = whole_state(model)
    logits_only = verify_function(model, lambda: permute_coupling(model, wrong, _swap01(wrong)), journaled=True)
    assert logits_only.passed and logits_only.rel_diff < 1e-6  # the blind spot: no token reaches it
    permute_coupling(model, wrong, _swap01(wrong))  # the swap is its own inverse: undo what the blind spot let in
    assert_same(model, before)
    named = rf"expert {e} of {path} \(coupling '{path}.{e}'\)"
    with pytest.raises(VerificationError, match=rf"1 expert\(s\).*{named}.*the router sent their tokens elsewhere"):
        verify_function(model, lambda: permute_coupling(model, wrong, _swap01(wrong)), journaled=True, moved=[wrong])
    assert_same(model, before)
    bad = dataclasses.replace(s, couplings=[wrong if c.name == wrong.name else c for c in s.couplings])
    with pytest.raises(ProbeError, match=named):
        probe_structures(model, bad)
    assert_same(model, before)


@pytest.mark.parametrize(
    "model_type, layout",
    [
        ("olmoe", "[E, 2I, H] / [E, H, I]"),
        ("gpt_oss", "transposed, gate/up interleaved, biases"),
        ("llama4_text", "transposed, tokens sorted per expert"),
        ("dbrx", "2-D [E*I, H]"),
    ],
)
def test_every_expert_layout_is_driven_and_a_wrong_down_move_is_named(model_type, layout):
    model = tiny_model(model_type)
    s = analyze(model, cross_check=False)
    assert any("experts in 2 modules driven one by one" in n for n in s.notes), layout
    wrong = _only(next(c for c in s.couplings if c.parent and c.name.endswith(".1")), "down")
    bad = dataclasses.replace(s, couplings=[wrong if c.name == wrong.name else c for c in s.couplings])
    before = whole_state(model)
    with pytest.raises(ProbeError, match=rf"expert 1 of {wrong.name[:-2]} "):
        probe_structures(model, bad)
    assert_same(model, before)


def test_the_fp32_check_holds_one_block_in_fp32_at_a_time_and_restores_the_tensors():
    model = tiny_llama(num_hidden_layers=4).to(torch.bfloat16)
    blocks = list(model.model.layers)
    inside = {id(p) for b in blocks for p in b.parameters()}
    seen = []

    def record(module, args, out):
        fp32 = {id(p) for p in model.parameters() if p.dtype == torch.float32}
        seen.append((fp32 & inside, fp32 - inside))

    before = whole_state(model)
    handle = blocks[2].mlp.register_forward_hook(record)
    try:
        ours = fp32_call(model, lambda: model(**make_inputs(model, 2, 8, 0)).logits)
    finally:
        handle.remove()
    assert_same(model, before)  # same objects, values, dtypes and hooks
    layer_fp32, rest_fp32 = seen[0]
    assert layer_fp32 == {id(p) for p in blocks[2].parameters()}  # only the running block
    assert rest_fp32 == {id(p) for p in model.parameters()} - inside  # embeddings, final norm, head
    with torch.no_grad():
        reference = model.float()(**make_inputs(model, 2, 8, 0)).logits
    assert torch.equal(ours, reference)  # exactly the fp32 model's logits


def test_an_interrupt_inside_the_fp32_forward_leaves_the_model_bit_identical():
    model = tiny_llama(num_hidden_layers=3).to(torch.bfloat16)
    c = analyze(model, cross_check=False)["model.layers.0.mlp"]
    before = whole_state(model)
    calls = []

    def interrupt(module, args, out):
        calls.append(1)
        if len(calls) == 2:  # the forward after the change
            raise KeyboardInterrupt("injected")

    handle = model.model.layers[1].register_forward_hook(interrupt)
    try:
        with pytest.raises(KeyboardInterrupt, match="injected"):
            verify_function(model, lambda: permute_coupling(model, c, _swap01(c)), journaled=True)
    finally:
        handle.remove()
    assert_same(model, before)


class _Toy(torch.nn.Module):
    """Calls a layer of its block outside the block's own call (what per-block upcasting cannot see)."""

    def __init__(self, strict: bool = False):
        super().__init__()
        self.emb = torch.nn.Embedding(16, 8)
        self.blocks = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh())])
        self.head = torch.nn.Linear(8, 16)
        self.strict = strict

    def forward(self, input_ids):
        h = self.blocks[0](self.emb(input_ids))
        h = self.blocks[0][0](h)  # the block's layer, outside the block's call
        if self.strict and h.dtype != torch.bfloat16:
            raise TypeError("this model only runs in bf16")
        return self.head(h)


def test_a_block_used_outside_its_call_is_checked_fully_upcast_and_a_model_that_cannot_run_in_fp32_is_named():
    torch.manual_seed(0)
    model = _Toy().to(torch.bfloat16)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        got = fp32_call(model, lambda: model(ids))
        reference = model.float()(ids)
    assert got.dtype == torch.float32 and torch.equal(got, reference)
    strict = _Toy(strict=True).to(torch.bfloat16)
    dtypes = {n: p.dtype for n, p in strict.named_parameters()}
    with pytest.raises(UpcastError, match=r"_Toy could not be evaluated in float32.*model.float\(\)"):
        fp32_call(strict, lambda: strict(ids))
    assert {n: p.dtype for n, p in strict.named_parameters()} == dtypes


def test_any_failure_of_the_graph_cross_check_falls_back_to_the_module_structure(monkeypatch):
    def broken(*args, **kwargs):
        raise TypeError("injected into the cross-check")

    monkeypatch.setattr(importlib.import_module("surgery.analyze"), "graph_cross_check", broken)
    model = tiny_llama()
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    s = analyze(model)
    assert any("module-structure path used: TypeError: injected" in n for n in s.notes)
    assert any(n.startswith("probe: all") for n in s.notes)
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks


def test_an_experts_forward_of_unknown_convention_is_named_not_driven(monkeypatch):
    monkeypatch.setattr(importlib.import_module("surgery.expert_check"), "_SORTED", set())
    s = analyze(tiny_model("llama4_text"), cross_check=False)  # its forward(hidden) is no longer declared
    assert not any(" modules driven one by one" in n for n in s.notes)
    undriven = [n for n in s.notes if n.startswith("probe: experts not driven one by one")]
    assert len(undriven) == 2 and all("Llama4TextExperts" in n for n in undriven)

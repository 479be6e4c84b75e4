"""Plans: slices match the permuted weights, apply verifies, JSON round-trips, wrong or bad plans refused."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from tiny_models import assert_same, state, tiny_llama

from benchmarks.lora_match import matched_lora_rank
from benchmarks.tiny_models import SUPPORTED_TINY, tiny_model
from surgery.analyze import analyze
from surgery.linear import resolve_linear, split_expert_name
from surgery.permute import IllegalPermutation
from surgery.plan import PlanError, S2Plan
from surgery.planner import applied_plan_id, apply_plan, make_plan, plan_id

RATIOS = dict(o_ratio=0.5, v_ratio=0.5, u_ratio=0.1, d_ratio=0.1)


def assert_slices_match(plan: S2Plan, permuted: torch.nn.Module, original: dict[str, torch.Tensor]) -> None:
    """Every trained block of the permuted model holds the original features ``slice.original``."""
    for sl in plan.slices:
        lin = resolve_linear(permuted, sl.module)
        w = lin.weight.detach()
        split = split_expert_name(sl.module)  # an expert: its slice of the 3-D parameter
        w0 = original[f"{sl.module}.weight"] if split is None else original[f"{split[0]}.{split[1]}"][split[2]]
        conv1d = type(lin).__name__ == "Conv1D"  # stored (in, out)
        axis = (1 if sl.feature == "in" else 0) ^ int(conv1d)
        assert torch.equal(
            w.index_select(axis, torch.tensor(sl.positions())),
            w0.index_select(axis, torch.tensor(sl.original)),
        )


def test_plan_slices_by_role_and_feature():
    model = tiny_llama()
    plan = make_plan(model, analyze(model), **RATIOS, seed=1)
    roles = {(sl.role, sl.feature, sl.module.rsplit(".", 1)[-1]) for sl in plan.slices}
    assert roles == {
        ("o", "in", "o_proj"),
        ("v", "out", "v_proj"),
        ("up", "out", "up_proj"),
        ("down", "in", "down_proj"),
    }
    for sl in plan.slices:
        unit = 8 if sl.role in ("o", "v") else 1
        chosen = plan.selected[sl.module.rsplit(".", 1)[0]][sl.role]
        assert sl.numel_features == unit * len(chosen)
        assert sorted({i // unit for i in sl.original}) == chosen  # original space = selected units
    assert plan.settings["o_ratio"] == 0.5 and plan.settings["strategy"] == "random"


def test_apply_verifies_and_slices_hold_the_selected_weights():
    model = tiny_llama()
    original = state(model)
    plan = make_plan(model, analyze(model), **RATIOS, seed=2)
    applied = apply_plan(model, plan)
    cert = applied.certificate
    assert cert["passed"] and cert["rel_diff"] <= 1e-4 and cert["dtype"] == "float32"
    assert plan.certificate is None  # the input plan is not modified
    assert applied_plan_id(model) == plan_id(plan)
    assert_slices_match(plan, model, original)


@pytest.mark.parametrize(("model_type", "overrides"), SUPPORTED_TINY, ids=lambda x: str(x))
def test_every_architecture_plan_applies(model_type, overrides):
    model = tiny_model(model_type, **overrides)
    s = analyze(model)
    roles = {m.role for c in s.couplings for m in c.members if m.module is not None}
    ratios = {
        k: v for k, v in RATIOS.items() if {"o_ratio": "o", "v_ratio": "v", "u_ratio": "up"}.get(k, "down") in roles
    }
    original = state(model)
    plan = make_plan(model, s, **ratios, seed=4)
    assert plan.slices
    applied = apply_plan(model, plan, s)
    assert applied.certificate["passed"]
    assert_slices_match(plan, model, original)


def test_json_round_trip_and_fresh_copy_bit_identical(tmp_path):
    a, b = tiny_llama(), tiny_llama()
    plan = apply_plan(a, make_plan(a, analyze(a), **RATIOS, seed=3))
    path = tmp_path / "plan.json"
    plan.save(path)
    loaded = S2Plan.load(path)
    assert loaded == plan and loaded.to_dict() == plan.to_dict()
    apply_plan(b, loaded)  # no structures given: the couplings stored in the plan are used
    assert_same(b, state(a))


def test_plan_for_different_model_refused():
    a, other = tiny_llama(), tiny_llama(intermediate_size=40)
    plan = make_plan(a, analyze(a), d_ratio=0.1)
    before = state(other)
    with pytest.raises(PlanError, match=rf"{plan.fingerprint}.*model has [0-9a-f]{{16}}"):
        apply_plan(other, plan)
    assert_same(other, before)


def test_the_fingerprint_sees_the_architecture_and_every_shape_not_the_weights_or_token_ids():
    from surgery.plan import model_fingerprint

    a, b = tiny_llama(), tiny_llama()
    b.model.layers[1].mlp.up_proj.weight.data.normal_()  # other weights
    b.config.pad_token_id = 7  # filled in by loading code
    assert model_fingerprint(a) == model_fingerprint(b)
    c = tiny_llama()  # one shape changed, the config the same
    c.model.layers[1].mlp.down_proj = torch.nn.Linear(48, 32 + 1, bias=True)
    assert model_fingerprint(c) != model_fingerprint(a)
    d = tiny_llama()  # the same shapes under another name
    d.model.layers[1].mlp.add_module("renamed", d.model.layers[1].mlp.down_proj)
    del d.model.layers[1].mlp.down_proj
    assert model_fingerprint(d) != model_fingerprint(a)
    assert model_fingerprint(tiny_llama(rope_theta=123.0)) != model_fingerprint(a)  # a function field of the config


def test_second_application_refused():
    model = tiny_llama()
    plan = make_plan(model, analyze(model), d_ratio=0.1)
    apply_plan(model, plan)
    after = state(model)
    with pytest.raises(PlanError, match="already permuted"):
        apply_plan(model, plan)
    with pytest.raises(PlanError, match="already carries applied plan"):
        make_plan(model, analyze(model), d_ratio=0.1)
    assert_same(model, after)


def _corrupt(d: dict, how: str) -> str:
    if how == "truncated":
        return json.dumps(d)[:-40]
    if how == "not_perm":
        name = next(iter(d["permutations"]))
        d["permutations"][name][0] = d["permutations"][name][1]
    elif how == "missing_key":
        del d["slices"]
    elif how == "runs_mismatch":
        d["slices"][0]["runs"][0][1] += 1
    elif how == "version":
        d["format_version"] = 99
    elif how == "array":
        return "[1, 2]"
    return json.dumps(d)


@pytest.mark.parametrize("how", ["truncated", "not_perm", "missing_key", "runs_mismatch", "version", "array"])
def test_corrupted_plan_file_refused(tmp_path, how):
    model = tiny_llama()
    plan = make_plan(model, analyze(model), **RATIOS)
    path = tmp_path / "plan.json"
    path.write_text(_corrupt(plan.to_dict(), how))
    with pytest.raises(PlanError):
        S2Plan.load(path)
    with pytest.raises(PlanError, match="does not exist"):
        S2Plan.load(tmp_path / "missing.json")


def test_illegal_plan_refused_all_or_nothing():
    model = tiny_llama()
    s = analyze(model)
    plan = make_plan(model, s, **RATIOS)
    plan.permutations["model.layers.1.self_attn"] = [0, 2, 1, 3]  # head 2 into kv group 0
    before = state(model)
    with pytest.raises(IllegalPermutation, match="kv group"):
        apply_plan(model, plan, s)
    assert_same(model, before)
    assert applied_plan_id(model) is None
    plan.permutations["model.layers.1.self_attn"] = [0, 1, 2]
    with pytest.raises(PlanError, match="has 3 entries"):
        apply_plan(model, plan, s)
    plan.permutations["model.layers.1.self_attn"] = [0, 1, 2, 3]
    plan.permutations["model.layers.9.mlp"] = list(range(48))
    with pytest.raises(PlanError, match="layers.9"):
        apply_plan(model, plan, s)
    del plan.permutations["model.layers.9.mlp"]
    other = analyze(tiny_llama(attention_bias=False))  # same coupling names, different members
    with pytest.raises(PlanError, match="differs from the structures given"):
        apply_plan(model, plan, other)
    assert_same(model, before)


@st.composite
def llama_configs(draw):
    kv = draw(st.sampled_from([1, 2]))
    group = draw(st.sampled_from([1, 2, 3]))
    heads = kv * group
    head_dim = draw(st.sampled_from([4, 8]))
    return dict(
        num_hidden_layers=draw(st.integers(1, 2)),
        hidden_size=heads * draw(st.sampled_from([4, 6, 8])),  # transformers wants heads | hidden
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        intermediate_size=draw(st.integers(8, 40)),
        attention_bias=draw(st.booleans()),
        mlp_bias=draw(st.booleans()),
        tie_word_embeddings=draw(st.booleans()),
    )


@settings(
    max_examples=15,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(cfg=llama_configs(), seed=st.integers(0, 3), strategy=st.sampled_from(["random", "weight"]))
def test_property_generated_llama_plans_verify(cfg, seed, strategy):
    model = tiny_model("llama", **cfg)
    s = analyze(model)
    heads = s.by_kind("heads")[0]
    ratios = dict(d_ratio=0.25, u_ratio=0.2)
    if heads.size > 1:
        ratios["o_ratio"] = 0.5
    if heads.num_groups > 1:
        ratios["v_ratio"] = 0.5
    original = state(model)
    plan = make_plan(model, s, **ratios, seed=seed, strategy=strategy)
    applied = apply_plan(model, plan, s)
    assert applied.certificate["passed"] and applied.certificate["rel_diff"] <= 1e-4
    assert_slices_match(plan, model, original)
    fresh = tiny_model("llama", **cfg)
    event(f"cross-group move checked: {heads.group_size > 1 and heads.num_groups > 1}")
    if heads.group_size > 1 and heads.num_groups > 1:
        bad = dict(plan.permutations)
        bad[heads.name] = [heads.group_size] + [i for i in range(heads.size) if i != heads.group_size]
        tampered = S2Plan.from_dict({**plan.to_dict(), "permutations": bad})
        fresh_before = state(fresh)
        with pytest.raises(IllegalPermutation, match="kv group"):
            apply_plan(fresh, tampered, s)
        assert_same(fresh, fresh_before)
    apply_plan(fresh, S2Plan.from_dict(json.loads(json.dumps(plan.to_dict()))))
    assert_same(fresh, state(model))


def test_make_plan_analyzes_when_no_structures_and_apply_without_verify():
    model = tiny_llama()
    plan = make_plan(model, d_ratio=0.1, seed=9)
    assert plan == make_plan(model, analyze(model), d_ratio=0.1, seed=9)
    copy = tiny_llama()
    applied = apply_plan(model, plan, verify=False)
    assert applied.certificate is None and applied_plan_id(model) == plan_id(plan)
    apply_plan(copy, plan)
    assert_same(copy, state(model))


def test_matched_lora_rank_counts_linear_and_conv1d_fans():
    llama = tiny_llama()
    c = llama.config
    h, i, q, kv = (
        c.hidden_size,
        c.intermediate_size,
        c.num_attention_heads * c.head_dim,
        c.num_key_value_heads * c.head_dim,
    )
    per_layer = (h + q) + 2 * (h + kv) + (h + i) + (i + h)  # q, k, v, up, down: in + out per unit of rank
    rank, per_rank = matched_lora_rank(llama, 3 * per_layer * c.num_hidden_layers)
    assert (rank, per_rank) == (3, per_layer * c.num_hidden_layers)
    assert matched_lora_rank(llama, 1)[0] == 1  # never rank 0
    gpt2 = tiny_model("gpt2")
    cc = gpt2.config
    # all-linear: c_attn (3e out), attn c_proj, c_fc, mlp c_proj (Conv1D, weight [in, out]); not lm_head
    e, inner = cc.n_embd, cc.n_inner or 4 * cc.n_embd
    per_block = (e + 3 * e) + 2 * e + 2 * (e + inner)
    assert matched_lora_rank(gpt2, 10, "all-linear")[1] == per_block * cc.n_layer
    with pytest.raises(ValueError, match="no Linear/Conv1D modules named"):
        matched_lora_rank(gpt2, 10)  # gpt2 has no q_proj/...: the error says which names to pass

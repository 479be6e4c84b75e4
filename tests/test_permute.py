"""Permutations of coupled structures keep the function, illegal ones are refused, failures roll back.

Structures come from `surgery.analyze` over every supported tiny architecture (GQA + RoPE, fused
qkv / gate_up, Conv1D, no-RoPE encoders, 3-D MoE experts); the residual-dimension coupling used for
the tied-embedding test is written out by hand.
"""

from __future__ import annotations

import random

import pytest
import torch
from tiny_models import assert_same, state, tiny_llama

from benchmarks.tiny_models import SUPPORTED_TINY, tiny_model
from surgery import permute as permute_mod
from surgery.analyze import analyze
from surgery.permute import (
    IllegalPermutation,
    check_permutation,
    front_permutation,
    permute_coupling,
    permute_elements,
    runs_of,
)
from surgery.structures import Coupling, Member
from surgery.verify import VerificationError, verify_function


def random_legal_perm(c: Coupling, rng: random.Random) -> list[int]:
    r = c.group_size
    groups = list(range(c.num_groups))
    rng.shuffle(groups)
    perm = []
    for g in groups:
        heads = list(range(g * r, (g + 1) * r))
        rng.shuffle(heads)
        perm += heads
    return perm


def test_random_legal_permutations_keep_function():
    model = tiny_llama()
    s = analyze(model)
    before = state(model)
    rng = random.Random(0)
    for c in s.couplings:
        perm = random_legal_perm(c, rng)
        while perm == sorted(perm):
            perm = random_legal_perm(c, rng)
        cert = verify_function(model, lambda c=c, perm=perm: permute_coupling(model, c, perm))
        assert cert.passed and cert.rel_diff <= 1e-4 and cert.dtype == "float32"
    o = "model.layers.0.self_attn.o_proj.weight"
    assert not torch.equal(state(model)[o], before[o])


def test_permutation_moves_every_member_consistently():
    model = tiny_llama()
    c = analyze(model)["model.layers.1.self_attn"]
    before = state(model)
    perm = [3, 2, 1, 0]  # group 1 to the front, heads swapped inside groups
    permute_coupling(model, c, perm)
    d = 8
    after = state(model)
    q = "model.layers.1.self_attn.q_proj.weight"
    o = "model.layers.1.self_attn.o_proj.weight"
    k = "model.layers.1.self_attn.k_proj.bias"
    for new, old in enumerate(perm):
        assert torch.equal(after[q][new * d : (new + 1) * d], before[q][old * d : (old + 1) * d])
        assert torch.equal(after[o][:, new * d : (new + 1) * d], before[o][:, old * d : (old + 1) * d])
    assert torch.equal(after[k][:d], before[k][d:]) and torch.equal(after[k][d:], before[k][:d])


def test_cross_group_head_swap_refused_untouched():
    model = tiny_llama()
    c = analyze(model)["model.layers.0.self_attn"]
    before = state(model)
    with pytest.raises(IllegalPermutation, match=r"layer 0.*GQA.*k_proj") as e:
        permute_coupling(model, c, [0, 2, 1, 3])
    assert "kv group" in str(e.value)
    assert_same(model, before)


def test_within_head_permutation_under_rope_refused_untouched():
    model = tiny_llama()
    c = analyze(model)["model.layers.1.self_attn"]
    before = state(model)
    elem = list(range(c.size * c.head_dim))
    elem[0], elem[1] = elem[1], elem[0]
    with pytest.raises(IllegalPermutation, match=r"layer 1.*RoPE"):
        permute_elements(model, c, elem)
    mixed = list(range(c.size * c.head_dim))
    mixed[0], mixed[8] = mixed[8], mixed[0]  # one dim of head 0 swapped with one of head 1
    with pytest.raises(IllegalPermutation, match="mix elements"):
        permute_elements(model, c, mixed)
    assert_same(model, before)


def test_whole_head_element_permutation_equals_head_permutation():
    a, b = tiny_llama(), tiny_llama()
    ca, cb = (analyze(m)["model.layers.0.self_attn"] for m in (a, b))
    perm = [2, 3, 1, 0]
    elem = [h * 8 + k for h in perm for k in range(8)]
    permute_elements(a, ca, elem)
    permute_coupling(b, cb, perm)
    assert_same(a, state(b))


def test_subset_of_members_refused_untouched():
    model = tiny_llama()
    c = analyze(model)["model.layers.0.mlp"]
    before = state(model)
    perm = list(reversed(range(c.size)))
    with pytest.raises(IllegalPermutation, match=r"layer 0.*only some members.*down"):
        permute_coupling(model, c, perm, members=[m for m in c.members if m.role != "down"])
    assert_same(model, before)
    permute_coupling(model, c, perm, members=list(c.members))  # the full set is fine
    assert not torch.equal(
        state(model)["model.layers.0.mlp.up_proj.weight"], before["model.layers.0.mlp.up_proj.weight"]
    )


@pytest.mark.parametrize("perm", [[0, 1, 2], [0, 0, 1, 2], [0, 1, 2, 4], ["a", 1, 2, 3]])
def test_not_a_permutation_refused(perm):
    model = tiny_llama()
    c = analyze(model)["model.layers.0.self_attn"]
    before = state(model)
    with pytest.raises(IllegalPermutation, match="permutation"):
        permute_coupling(model, c, perm)
    assert_same(model, before)


def test_failure_midway_restores_bit_exactly(monkeypatch):
    model = tiny_llama()
    c = analyze(model)["model.layers.0.self_attn"]
    before = state(model)
    real, calls = permute_mod._apply_member, []

    def flaky(t, m, idx):
        calls.append(m.param)
        if len(calls) == 4:
            raise RuntimeError("simulated failure")
        real(t, m, idx)

    monkeypatch.setattr(permute_mod, "_apply_member", flaky)
    with pytest.raises(RuntimeError, match="simulated"):
        permute_coupling(model, c, [2, 3, 0, 1])
    assert len(calls) == 4 + 3  # the fourth move fails; the three done are undone by their inverses
    assert calls[4:] == calls[:3][::-1]
    assert_same(model, before)


def test_missing_parameter_refused_before_touching():
    model = tiny_llama()
    c = analyze(model)["model.layers.0.mlp"]
    bad = Coupling(c.name, c.kind, c.layer, c.size, c.members + (Member("model.nope.weight", 0, c.size),))
    before = state(model)
    with pytest.raises(IllegalPermutation, match="nope"):
        permute_coupling(model, bad, list(reversed(range(c.size))))
    assert_same(model, before)


def hidden_coupling(model: torch.nn.Module) -> Coupling:
    """The residual dimension of a Llama model: embeddings, every norm, all projections, lm_head."""
    h = model.config.hidden_size
    ms = []
    for n, _ in model.named_parameters(remove_duplicate=False):
        if (
            "embed_tokens" in n or n.startswith("lm_head") or any(k in n for k in ("q_proj.w", "k_proj.w", "v_proj.w"))
        ) or any(k in n for k in ("gate_proj.w", "up_proj.w")):
            ms.append(Member(n, 1, h))
        elif any(k in n for k in ("o_proj", "down_proj")) or "norm" in n:
            ms.append(Member(n, 0, h))
    return Coupling("hidden", "ffn", -1, h, tuple(ms))


def test_tied_embeddings_permuted_once():
    model = tiny_llama(tie_word_embeddings=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    c = hidden_coupling(model)
    emb = model.model.embed_tokens.weight.detach().clone()
    perm = list(range(1, c.size)) + [0]  # a cycle: applying it twice would differ from once
    cert = verify_function(model, lambda: permute_coupling(model, c, perm))
    assert cert.passed
    assert torch.equal(model.model.embed_tokens.weight, emb[:, perm])


def test_fused_gate_up_halves_move_together_phi3():
    model = tiny_model("phi3", num_key_value_heads=2)
    ffn = analyze(model)["model.layers.0.mlp"]
    inter = ffn.size
    name = "model.layers.0.mlp.gate_up_proj.weight"
    assert {m.offset for m in ffn.members if m.param == name} == {0, inter}
    perm = list(range(inter))
    random.Random(1).shuffle(perm)
    w = model.get_parameter(name).detach().clone()
    assert verify_function(model, lambda: permute_coupling(model, ffn, perm)).passed
    now = model.get_parameter(name)
    assert torch.equal(now[:inter], w[:inter][perm]) and torch.equal(now[inter:], w[inter:][perm])


def test_within_head_permutation_without_rope_gpt2_conv1d():
    model = tiny_model("gpt2")
    heads = analyze(model)["transformer.h.0.attn"]
    assert not heads.rope
    d = heads.head_dim
    inner = list(range(d))
    random.Random(2).shuffle(inner)
    elem = [h * d + k for h in [1, 3, 0, 2] for k in inner]  # heads move and dims reorder inside heads
    w = model.get_parameter("transformer.h.0.attn.c_proj.weight").detach().clone()
    assert verify_function(model, lambda: permute_elements(model, heads, elem)).passed
    # Conv1D stores (in, out): the o member permutes rows of c_proj.
    assert torch.equal(model.get_parameter("transformer.h.0.attn.c_proj.weight"), w[elem])


def test_3d_expert_parameters_mixtral():
    model = tiny_model("mixtral")
    s = analyze(model)
    channels = s["model.layers.0.mlp.experts.1"]
    inter = channels.size
    gu = model.get_parameter("model.layers.0.mlp.experts.gate_up_proj")
    before = gu.detach().clone()
    perm = list(reversed(range(inter)))
    assert verify_function(model, lambda: permute_coupling(model, channels, perm)).passed
    assert torch.equal(gu[0], before[0]) and torch.equal(gu[2], before[2])  # other experts untouched
    assert torch.equal(gu[1, :inter], before[1, :inter][perm])
    assert torch.equal(gu[1, inter:], before[1, inter:][perm])
    experts = s["model.layers.0.mlp"]
    assert experts.kind == "experts"
    assert verify_function(model, lambda: permute_coupling(model, experts, [2, 0, 3, 1])).passed


@pytest.mark.parametrize(("model_type", "overrides"), SUPPORTED_TINY, ids=lambda x: str(x))
def test_every_architecture_random_legal_permutations_verify(model_type, overrides):
    model = tiny_model(model_type, **overrides)
    s = analyze(model)
    rng = random.Random(7)
    items = [(c, random_legal_perm(c, rng)) for c in s.couplings]
    cert = verify_function(model, lambda: permute_mod.apply_permutations(model, items))
    assert cert.passed and cert.rel_diff <= 1e-4
    before = state(model)
    for c in s.by_kind("heads"):
        if c.group_size > 1:
            bad = list(range(c.size))
            bad[0], bad[c.group_size] = bad[c.group_size], bad[0]  # head 0 into kv group 1
            with pytest.raises(IllegalPermutation, match="kv group"):
                permute_coupling(model, c, bad)
        if c.rope:
            elem = list(range(c.size * c.head_dim))
            elem[0], elem[1] = elem[1], elem[0]
            with pytest.raises(IllegalPermutation, match="RoPE"):
                permute_elements(model, c, elem)
    assert_same(model, before)


def test_verification_failure_restores_model():
    model = tiny_llama()
    c = analyze(model)["model.layers.0.self_attn"]
    wrong = Coupling(c.name, c.kind, c.layer, c.size, c.members, c.group_size, rope=False, head_dim=c.head_dim)
    elem = [h * 8 + (k + 1) % 8 for h in range(4) for k in range(8)]  # legal without RoPE, wrong with it
    before = state(model)
    with pytest.raises(VerificationError, match="changed the model's function"):
        verify_function(model, lambda: permute_elements(model, wrong, elem))
    assert_same(model, before)

    def boom():
        model.model.norm.weight.data.mul_(2)
        raise KeyError("mutation failed")

    with pytest.raises(KeyError):
        verify_function(model, boom)
    assert_same(model, before)


def test_verify_bf16_and_training_flags():
    model = tiny_llama().to(torch.bfloat16)
    model.train()
    model.model.layers[0].eval()
    c = analyze(model)["model.layers.1.mlp"]
    perm = list(reversed(range(c.size)))
    cert = verify_function(model, lambda: permute_coupling(model, c, perm), n_inputs=1, seq_len=8, seed=3)
    assert cert.passed and cert.n_inputs == 1
    # a bf16 model is checked in fp32 at the fp32 tolerance (surgery.upcast); a correct plan measures ~1e-7
    assert (cert.dtype, cert.check_dtype, cert.tolerance) == ("bfloat16", "float32", 1e-4) and cert.rel_diff < 1e-5
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.training and not model.model.layers[0].training and model.model.layers[1].training


def test_runs_of():
    assert runs_of([]) == []
    assert runs_of([5, 0, 1, 2, 7, 6, 2]) == [(0, 3), (5, 8)]


def test_front_permutation_single_role_is_prefix_and_legal():
    model = tiny_llama()
    s = analyze(model)
    ffn = s["model.layers.0.mlp"]
    sel = [40, 3, 17]
    perm = front_permutation(ffn, {"down": sel})
    assert perm[:3] == sorted(sel) and sorted(perm) == list(range(ffn.size))
    heads = s["model.layers.0.self_attn"]
    for o_sel in ([1, 2], [3], [0, 1, 3]):
        perm = check_permutation(heads, front_permutation(heads, {"o": o_sel}))
        first = perm.index(min(o_sel, key=perm.index))
        assert first == 0 and set(o_sel) <= set(perm)
    # GQA: heads 1 and 2 live in different kv groups, so each group puts its selected head first.
    assert front_permutation(heads, {"o": [1, 2]}) == [1, 0, 2, 3]
    assert front_permutation(heads, {"v": [1]})[:2] == [2, 3]


def test_front_permutation_two_roles_contiguous():
    model = tiny_llama()
    ffn = analyze(model)["model.layers.0.mlp"]
    down, up = [1, 5, 9, 30], [5, 9, 12, 44, 47]
    perm = front_permutation(ffn, {"down": down, "up": up})
    inv = {old: new for new, old in enumerate(perm)}
    for sel in (down, up):
        pos = sorted(inv[i] for i in sel)
        assert len(runs_of(pos)) == 1
    with pytest.raises(IllegalPermutation, match="out of range"):
        front_permutation(ffn, {"up": [48]})
    with pytest.raises(IllegalPermutation, match="no members with role"):
        front_permutation(ffn, {"o": [0]})


def test_gqa_inner_order_must_agree_within_kv_group_without_rope():
    model = tiny_llama()
    c = analyze(model)["model.layers.0.self_attn"]
    no_rope = Coupling(c.name, c.kind, c.layer, c.size, c.members, c.group_size, rope=False, head_dim=c.head_dim)
    shift = [(k + 1) % 8 for k in range(8)]
    ident = list(range(8))
    before = state(model)
    mixed = [h * 8 + k for h, inner in zip(range(4), [shift, ident, ident, ident]) for k in inner]
    with pytest.raises(IllegalPermutation, match="one inner order per group"):
        permute_elements(model, no_rope, mixed)
    assert_same(model, before)
    agreed = [h * 8 + k for h, inner in zip(range(4), [shift, shift, ident, ident]) for k in inner]
    permute_elements(model, no_rope, agreed)  # legal without RoPE: k/v head 0 and q heads 0, 1 all shift
    k = "model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(state(model)[k][:8], before[k][shift]) and torch.equal(state(model)[k][8:], before[k][8:])

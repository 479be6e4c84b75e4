"""Structure discovery: couplings match the config, legal permutations keep the function, bad inputs raise."""

from __future__ import annotations

import dataclasses
import importlib
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from benchmarks.tiny_models import SUPPORTED_TINY, tiny_model
from surgery.analyze import StructureError, analyze
from surgery.graph import GraphTimeout, build_graph, coupled_indices, cross_check
from surgery.heads import HeadConfigError, head_info
from surgery.linear import ExpertLinear, resolve_linear
from surgery.structures import Coupling, Member, ModelStructures

CASES = [pytest.param(mt, ov, id=mt + "".join(f"-{k}{v}" for k, v in ov.items())) for mt, ov in SUPPORTED_TINY]
NO_ROPE = {"gpt2", "opt", "bert"}
GATED = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "mixtral", "qwen2_moe"}


def _ffn_width(cfg) -> int:
    for key in ("intermediate_size", "ffn_dim", "n_inner"):
        v = getattr(cfg, key, None)
        if v:
            return v
    return 4 * cfg.hidden_size


def _inputs(model: nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, model.config.vocab_size, (2, 9), generator=g)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _spread_weights(model: nn.Module) -> None:
    """Random init at std 0.02 makes outputs nearly insensitive to anything; widen it so tests have teeth."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.15)


def _random_perms(c: Coupling, g: torch.Generator) -> dict[str, list[int]]:
    """A random LEGAL permutation: kv groups move as units, q heads within their group; channels freely."""
    if c.kind == "heads":
        r = c.group_size
        groups = torch.randperm(c.num_groups, generator=g).tolist()
        heads = [grp * r + i for grp in groups for i in torch.randperm(r, generator=g).tolist()]
        return {"unit": heads, "group": groups}
    p = torch.randperm(c.size, generator=g).tolist()
    return {"unit": p, "group": p}


def _apply_member(t: torch.Tensor, m: Member, perm: list[int]) -> None:
    """Move index ``perm[p]`` of member ``m`` to position ``p`` with plain index_select."""
    view, axis = t, m.axis
    for dim, i in sorted(m.fixed, reverse=True):
        view = view.select(dim, i)
        axis -= dim < m.axis
    idx = torch.arange(view.shape[axis])
    for p, src in enumerate(perm):
        dst0, src0 = m.offset + p * m.step, m.offset + src * m.step
        idx[dst0 : dst0 + m.unit] = torch.arange(src0, src0 + m.unit)
    view.copy_(view.index_select(axis, idx))


def _apply(model: nn.Module, couplings: list[Coupling], g: torch.Generator) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for c in couplings:
            perms = _random_perms(c, g)
            for m in c.members:
                _apply_member(params[m.param].data, m, perms[m.level])


@pytest.mark.parametrize(("model_type", "overrides"), CASES)
def test_couplings_match_config(model_type, overrides):
    model = tiny_model(model_type, **overrides)
    cfg = model.config
    s = analyze(model)
    info = head_info(cfg)
    params = dict(model.named_parameters())
    assert s.num_layers == 2 and s.model_type == model_type
    for layer in range(2):
        heads = [c for c in s.by_kind("heads") if c.layer == layer]
        assert len(heads) == 1
        h = heads[0]
        kv = getattr(cfg, "num_key_value_heads", None) or info.num_heads
        assert (h.size, h.num_groups, h.group_size) == (
            cfg.num_attention_heads,
            kv,
            cfg.num_attention_heads // kv,
        )
        assert h.head_dim == (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        assert h.rope == (model_type not in NO_ROPE)
        roles = {m.role for m in h.members}
        assert {"q", "k", "v", "o"} <= roles
        for m in h.members:
            assert m.unit == h.head_dim
            want = (h.num_groups, "group") if m.role in ("k", "v") and kv != h.size else None
            if want:
                assert (m.count, m.level) == want
            elif m.role in ("q", "o"):
                assert (m.count, m.level) == (h.size, "unit")
        ffns = [c for c in s.by_kind("ffn") if c.layer == layer and c.parent is None]
        experts = [c for c in s.by_kind("experts") if c.layer == layer]
        if model_type in ("mixtral", "qwen2_moe"):
            (e,) = experts
            n_exp = getattr(cfg, "num_local_experts", None) or cfg.num_experts
            assert e.size == n_exp and e.by_role("router")
            children = [c for c in s.by_kind("ffn") if c.parent == e.name]
            assert len(children) == n_exp
            width = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
            assert all(c.size == width and {"gate", "up", "down"} <= {m.role for m in c.members} for c in children)
            shared = [c.size for c in ffns]
            assert shared == ([cfg.shared_expert_intermediate_size] if model_type == "qwen2_moe" else [])
        else:
            assert not experts and len(ffns) == 1
            f = ffns[0]
            assert f.size == _ffn_width(cfg)
            assert ({"gate", "up", "down"} if model_type in GATED else {"up", "down"}) <= {m.role for m in f.members}
    for c in s.couplings:
        for m in c.members:
            p = params[m.param]
            assert m.offset + m.extent <= p.shape[m.axis]
            if m.module is not None:  # a feature axis of a linear: the module (or expert) owns the parameter
                lin = resolve_linear(model, m.module)
                owns = lin.owner.get_parameter(lin.param) is p if isinstance(lin, ExpertLinear) else lin.weight is p
                assert owns and m.feature in ("in", "out")
    assert ModelStructures.from_dict(s.to_dict()) == s


@pytest.mark.parametrize(("model_type", "overrides"), CASES)
def test_random_legal_permutation_keeps_logits(model_type, overrides):
    model = tiny_model(model_type, **overrides)
    _spread_weights(model)
    s = analyze(model)
    ids = _inputs(model)
    before = _logits(model, ids)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    ordered = sorted(s.couplings, key=lambda c: c.kind == "experts")  # per-expert channels before experts
    _apply(model, ordered, torch.Generator().manual_seed(7))
    moved = sum(not torch.equal(w0[n], p) for n, p in model.named_parameters())
    assert moved >= 4  # the permutation really touched the weights
    after = _logits(model, ids)
    assert before.abs().max() > 0.1
    assert (after - before).abs().max().item() <= 1e-4 * max(1.0, before.abs().max().item())


# Beyond SUPPORTED_TINY: other families the generic recognition handles (not used by other test files).
EXTRA = [
    ("phi", {}),
    ("gptj", {}),
    ("olmo2", {}),
    ("starcoder2", {}),
    ("gemma3_text", {}),
    ("qwen3_moe", {}),
    ("roberta", {}),
    ("distilbert", {}),
    ("cohere", {"use_qk_norm": True}),
    ("mpt", {}),
]


@pytest.mark.parametrize(("model_type", "overrides"), [pytest.param(*c, id=c[0]) for c in EXTRA])
def test_other_families_permute_exactly(model_type, overrides):
    model = tiny_model(model_type, **overrides)
    _spread_weights(model)
    s = analyze(model)
    ids = _inputs(model)
    before = _logits(model, ids)
    _apply(model, sorted(s.couplings, key=lambda c: c.kind == "experts"), torch.Generator().manual_seed(5))
    assert (_logits(model, ids) - before).abs().max().item() <= 1e-4 * max(1.0, before.abs().max().item())
    if model_type == "mpt":  # ALiBi: heads are recognised but deliberately not coupled
        assert not s.by_kind("heads") and any("ALiBi" in n for n in s.notes)
    else:
        assert len(s.by_kind("heads")) == 2


@pytest.mark.parametrize(
    ("model_type", "message"),
    [
        ("falcon", "FalconAttention has a qkv layout this analysis cannot prove"),
        ("bloom", "BloomAttention has a qkv layout this analysis cannot prove"),
        ("codegen", r"qkv_proj of CodeGenAttention .*cannot prove.*\[q \| k \| v\]"),
    ],
)
def test_unprovable_fused_qkv_keeps_heads_frozen_and_o_ratio_is_refused_naming_it(model_type, message):
    """Partial coverage: the heads are named frozen (never guessed: CodeGen's interleaving once corrupted models
    silently), the FFNs train, and a ratio that needs heads is refused before anything moves."""
    from s2ft_lightning.pipeline import S2Config, prepare_model
    from surgery.config import SelectionError

    model = tiny_model(model_type)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    s = analyze(model)
    assert len(s.frozen) == 2 and all(f.roles == ("o", "v") for f in s.frozen)
    assert not s.by_kind("heads") and len(s.by_kind("ffn")) == 2
    with pytest.raises(SelectionError, match=rf"o_ratio=0.25 .*{message}"):
        prepare_model(model, S2Config(o_ratio=0.25))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_unknown_per_head_parameter_keeps_those_heads_frozen():
    model = tiny_model("llama")
    model.model.layers[0].self_attn.bias_table = nn.Parameter(torch.ones(4, 3))  # a per-head tensor of a new kind
    s = analyze(model)
    assert [(f.name, f.roles) for f in s.frozen] == [("model.layers.0.self_attn", ("o", "v"))]
    assert "self_attn.bias_table (4, 3) has a per-head dimension" in s.frozen[0].reason
    assert [c.layer for c in s.by_kind("heads")] == [1]


def test_illegal_permutations_change_logits():
    """Controls: the equivalence test catches a q head moved across kv groups or an FFN member left out."""
    model = tiny_model("llama", num_key_value_heads=2)
    _spread_weights(model)
    s = analyze(model)
    ids = _inputs(model)
    before = _logits(model, ids)
    heads = s["model.layers.0.self_attn"]
    cross = [2, 1, 0, 3]  # q head 0 <-> 2: different kv groups, k/v left in place
    with torch.no_grad():
        params = dict(model.named_parameters())
        for m in heads.members:
            if m.level == "unit":
                _apply_member(params[m.param].data, m, cross)
    assert (_logits(model, ids) - before).abs().max() > 1e-3
    model = tiny_model("llama")
    _spread_weights(model)
    before = _logits(model, ids)
    ffn = analyze(model, cross_check=False)["model.layers.0.mlp"]
    with torch.no_grad():
        up = ffn.by_role("up")[0]
        _apply_member(dict(model.named_parameters())[up.param].data, up, list(reversed(range(ffn.size))))
    assert (_logits(model, ids) - before).abs().max() > 1e-3


def test_plain_mlp_without_attention_raises():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    with pytest.raises(StructureError, match="no attention blocks"):
        analyze(model)


def test_model_type_without_attention_raises():
    model = tiny_model("mamba")
    with pytest.raises(StructureError, match="MambaForCausalLM: no attention blocks"):
        analyze(model, time_budget_s=20.0)  # a traversal that ran away would raise GraphTimeout instead


def test_layer_missing_ffn_is_named_and_the_others_train():
    """Partial coverage: a layer without an FFN is named in the notes; the FFNs that exist still train."""
    from s2ft_lightning.pipeline import S2Config, prepare_model

    model = tiny_model("llama")
    model.model.layers[1].mlp = nn.Identity()
    s = analyze(model)
    assert "layer 1 (model.layers.1): no FFN found; nothing there to train" in s.notes and not s.frozen
    plan = prepare_model(model, S2Config(d_ratio=0.25))
    assert {x.module for x in plan.slices} == {"model.layers.0.mlp.down_proj"}


def test_attention_without_config_raises():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(8, 8) for _ in range(4))

    with pytest.raises(StructureError, match="no config"):
        analyze(nn.Sequential(Attn()))


def test_inconsistent_head_config_raises():
    with pytest.raises(HeadConfigError, match="not a multiple of num_key_value_heads"):
        head_info(SimpleNamespace(num_attention_heads=6, num_key_value_heads=4, hidden_size=24))
    with pytest.raises(HeadConfigError, match="set config.head_dim"):
        head_info(SimpleNamespace(num_attention_heads=5, hidden_size=24))
    info = head_info(SimpleNamespace(num_attention_heads=8, num_key_value_heads=2, head_dim=16, hidden_size=64))
    assert (info.group_size, info.q_width, info.kv_width, info.rope) == (4, 128, 32, True)


def test_config_lying_about_head_layout_raises():
    """Config edited after build: shapes still fit, but the traced GQA index map exposes the lie."""
    model = tiny_model("llama", num_key_value_heads=2)
    model.config.num_attention_heads, model.config.num_key_value_heads, model.config.head_dim = 2, 1, 16
    with pytest.raises(StructureError, match=r"layer 0 model\.layers\.0\.self_attn: graph couples"):
        analyze(model)


def test_config_head_dim_not_matching_weights_keeps_the_heads_frozen_and_refuses_o_ratio():
    """Widths that disagree with the config: the heads are never guessed; a ratio needing them is refused."""
    from s2ft_lightning.pipeline import S2Config, prepare_model
    from surgery.config import SelectionError

    model = tiny_model("qwen3", num_key_value_heads=2, head_dim=16)
    model.config.head_dim = 8
    s = analyze(model)
    assert [f.name for f in s.frozen] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert not s.by_kind("heads") and len(s.by_kind("ffn")) == 2
    with pytest.raises(SelectionError, match=r"o_ratio=0.25 .*q_proj has 64 output features.*implies 32"):
        prepare_model(model, S2Config(o_ratio=0.25))


def test_cross_check_reports_wrong_gqa_mapping():
    model = tiny_model("mistral")
    s = analyze(model)
    good = s["model.layers.0.self_attn"]
    bad = Coupling(**{**good.__dict__, "group_size": 1})  # claims q head h reads kv head h
    assert not cross_check(model, [good]).conflicts
    report = cross_check(model, [bad])
    assert report.conflicts and "k_proj" in " ".join(report.conflicts)


def test_analyze_restores_model_state():
    model = tiny_model("llama", num_key_value_heads=2)
    model.train()
    model.model.layers[0].eval()
    model.lm_head.weight.requires_grad_(False)
    impl = model.config._attn_implementation
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = {n: m.training for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    analyze(model)
    assert impl == "sdpa" and model.config._attn_implementation == impl
    assert modes == {n: m.training for n, m in model.named_modules()}
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_graph_time_budget_prevents_hang():
    model = tiny_model("llama", num_key_value_heads=2)
    dg = build_graph(model)
    o_proj = model.model.layers[0].self_attn.o_proj
    with pytest.raises(GraphTimeout, match="budget"):
        coupled_indices(dg, o_proj, "in", range(32), time_budget_s=0.0)
    with pytest.raises(GraphTimeout):  # stock torch-pruning cycles forever here (VainF/Torch-Pruning#527)
        coupled_indices(build_graph(model), o_proj, "in", range(32), time_budget_s=1.0, fix_concat=False)
    s = analyze(model, time_budget_s=0.0)  # falls back to the module-structure path, with a note
    assert any("cross-check skipped" in n for n in s.notes)


def test_gqa_rope_graph_confirms_kv_mapping():
    model = tiny_model("qwen2", num_key_value_heads=2)
    # With the concat fix the traversal ends; without it, it would run into the time budget (GraphTimeout).
    report = cross_check(model, analyze(model, cross_check=False).by_kind("heads"))
    assert not report.conflicts
    assert any("k_proj" in x for x in report.confirmed) and any("v_proj" in x for x in report.confirmed)


def test_tied_weights_and_shared_head_norm_notes():
    s = analyze(tiny_model("gpt2"))
    assert ("transformer.wte.weight", "lm_head.weight") in s.tied
    q3 = analyze(tiny_model("qwen3", num_key_value_heads=2, head_dim=16))
    assert any("q_norm/k_norm" in n and "not permuted" in n for n in q3.notes)
    assert all("norm" not in m.param for c in q3.couplings for m in c.members)


# ---------------------------------------------------------------- analyses that cannot pass vacuously


def test_the_probe_catches_a_wrong_fused_layout_the_name_check_would_let_through(monkeypatch):
    sa = importlib.import_module("surgery.analyze")  # the package exports a function of the same name

    monkeypatch.setattr(sa, "_PLAIN_FUSED_QKV", ("Phi3", "GPT2", "CodeGen"))  # pretend CodeGen were [q|k|v]
    model = tiny_model("codegen")
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(StructureError, match=r"structure analysis of codegen is wrong.*layer 0 heads coupling"):
        analyze(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # probe undone exactly


def test_a_wrong_coupling_is_caught_even_when_the_plan_moves_nothing_of_it(monkeypatch):
    """Drop v_proj from layer 1's heads coupling with the graph cross-check unavailable (as when tracing fails):
    a plan training only FFN channels never moves those heads, so only the probe can notice. Nothing is
    changed and the error names the coupling."""
    sa = importlib.import_module("surgery.analyze")  # the package exports a function of the same name
    from s2ft_lightning.pipeline import S2Config, prepare_model

    run = sa._Finder.run

    def wrong(self):
        run(self)
        for i, c in enumerate(self.couplings):
            if c.kind == "heads" and c.layer == 1:
                members = [m for m in c.members if "v_proj" not in m.param]
                self.couplings[i] = dataclasses.replace(c, members=members)

    def no_graph(*a, **k):
        raise sa.GraphError("tracing unavailable (simulated)")

    monkeypatch.setattr(sa._Finder, "run", wrong)
    monkeypatch.setattr(sa, "build_graph", no_graph)
    model = tiny_model("llama", num_key_value_heads=2)
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(StructureError, match=r"layer 1 heads coupling 'model\.layers\.1\.self_attn'"):
        prepare_model(model, S2Config(o_ratio=0.0, d_ratio=0.25))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    s = analyze(model, probe=False)  # the unproven result is still available to inspect
    assert any(c.layer == 1 and c.kind == "heads" for c in s.couplings)


def test_every_supported_architecture_passes_the_probe():
    for model_type, kw in SUPPORTED_TINY:
        s = analyze(tiny_model(model_type, **kw))
        assert any(n.startswith("probe: all") for n in s.notes), model_type


def test_the_head_model_says_what_it_found_about_positions():
    llama = analyze(tiny_model("llama"), probe=False)
    assert "positions: rotary (config sets rope_parameters)" in llama.notes
    assert all(c.rope for c in llama.couplings if c.kind == "heads")
    gpt2 = analyze(tiny_model("gpt2"), probe=False)
    assert any(n.startswith("positions: not rotary (model_type 'gpt2'") for n in gpt2.notes)
    # A family the config tables do not know: the learned position table in the module tree decides.
    unknown = tiny_model("gpt2")
    unknown.config.model_type = "my_gpt"
    s = analyze(unknown, probe=False)
    assert "positions: not rotary (learned position embedding transformer.wpe)" in s.notes
    assert not any(c.rope for c in s.couplings if c.kind == "heads")


def test_the_analysis_needs_no_torch_pruning(monkeypatch):
    """torch-pruning is an optional cross-check (the crosscheck extra): without it the module-structure analysis
    is proved by the probe alone, and the notes say the cross-check was skipped."""
    monkeypatch.setitem(sys.modules, "torch_pruning", None)  # import torch_pruning raises ImportError
    model = tiny_model("llama", num_key_value_heads=2)
    s = analyze(model)
    assert any("graph cross-check skipped" in n and "torch-pruning is not installed" in n for n in s.notes)
    assert any(n.startswith("probe: all") for n in s.notes)
    monkeypatch.undo()
    assert [c.to_dict() for c in s.couplings] == [c.to_dict() for c in analyze(model).couplings]

"""S2 layers on tiny random transformers: exact block gradients, training equivalence, memory, state forms, errors."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from benchmarks.tiny_models import perturb
from s2ft_lightning.layers import (
    S2InstallError,
    S2Linear,
    block_parameters,
    install,
    installed,
    state_dict_form,
    trainable_state,
    trainable_state_dict,
    uninstall,
)
from s2ft_lightning.ops import gather_runs
from s2ft_lightning.optim import block_param_groups
from surgery.plan import BlockSlice, PlanError, S2Plan, model_fingerprint

transformers = pytest.importorskip("transformers")


def _llama(dtype=torch.float32):
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attn_implementation="eager",
    )  # fmt: skip
    return perturb(transformers.LlamaForCausalLM(cfg)).to(dtype)


def _slices():
    return [
        BlockSlice("model.layers.0.self_attn.o_proj", "o", "in", [(0, 8), (16, 24)], list(range(16))),
        BlockSlice("model.layers.0.mlp.down_proj", "down", "in", [(3, 9)], list(range(6))),
        BlockSlice("model.layers.1.self_attn.v_proj", "v", "out", [(0, 4), (8, 10)], list(range(6))),
        BlockSlice("model.layers.1.mlp.up_proj", "up", "out", [(5, 12)], list(range(7))),
        BlockSlice("model.layers.1.mlp.down_proj", "down", "in", [(40, 48)], list(range(8))),
    ]


def _pair(dtype=torch.float32):
    torch.manual_seed(0)
    model = _llama(dtype)
    ref = _llama(dtype)
    ref.load_state_dict(model.state_dict())
    return model, ref


def _full_block_grads(ref, slices):
    mods = dict(ref.named_modules())
    return [gather_runs(mods[s.module].weight.grad, s.runs, dim=0 if s.feature == "out" else 1) for s in slices]


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def _ids(b=2, t=10, seed=1):
    return torch.randint(0, 64, (b, t), generator=torch.Generator().manual_seed(seed))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_block_grads_equal_full_finetuning_blocks():
    model, ref = _pair()
    wrappers = install(model, _slices())
    ids = _ids()
    model(ids, labels=ids).loss.backward()
    ref(ids, labels=ids).loss.backward()
    for s, g in zip(_slices(), _full_block_grads(ref, _slices())):
        blk = wrappers[s.module].deltas[0]
        assert blk.grad.shape == g.shape and _rel(blk.grad, g) <= 1e-5
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{s.module}.delta_0" for s in _slices()}
    for n, p in model.named_parameters():
        if not n.endswith("delta_0"):
            assert p.grad is None and not p.requires_grad, n


def test_sgd_steps_equal_masked_full_finetuning():
    model, ref = _pair()
    install(model, _slices())
    opt = torch.optim.SGD(block_parameters(model), lr=0.5)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    mods = dict(ref.named_modules())
    masks = {}
    for s in _slices():
        w = mods[s.module].weight
        mask = torch.zeros_like(w, dtype=torch.bool)
        for a, b in s.runs:
            (mask[a:b] if s.feature == "out" else mask[:, a:b]).fill_(True)
        masks[w] = mask
    for step in range(3):
        ids = _ids(seed=step)
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()
        ref_opt.zero_grad()
        ref(ids, labels=ids).loss.backward()
        for p in ref.parameters():
            p.grad = p.grad * masks[p] if p in masks else None
        ref_opt.step()
    ids = _ids(seed=9)
    assert _rel(model(ids).logits, ref(ids).logits) <= 1e-5
    uninstall(model, merge=True)
    for (n, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        assert _rel(a, b) <= 1e-5, n


def test_grad_accumulation_and_clipping():
    model, _ = _pair()
    install(model, _slices())
    ids = _ids(b=8, t=6)
    model(ids, labels=ids).loss.backward()
    big = [p.grad.clone() for p in block_parameters(model)]
    model.zero_grad()
    for i in range(4):
        mb = ids[2 * i : 2 * i + 2]
        (model(mb, labels=mb).loss / 4).backward()
    for p, g in zip(block_parameters(model), big):
        assert _rel(p.grad, g) <= 1e-5
    expect = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in big]))
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e-3)
    assert _rel(norm, expect) <= 1e-5
    clipped = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in block_parameters(model)]))
    assert abs(clipped.item() - 1e-3) <= 1e-6


def test_gradient_checkpointing_non_reentrant():
    model, ref = _pair()
    install(model, _slices())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # renamed in transformers 5.2x; keep the old name
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    calls = []
    installed(model)["model.layers.0.mlp.down_proj"].register_forward_pre_hook(lambda *a: calls.append(1))
    ids = _ids()
    model(ids, labels=ids).loss.backward()
    assert len(calls) == 2  # forward + recompute in backward
    ref(ids, labels=ids).loss.backward()
    for p, g in zip(block_parameters(model), _full_block_grads(ref, _slices())):
        assert _rel(p.grad, g) <= 1e-5


def test_saved_activations_input_sliced_keep_only_k_columns():
    model, _ = _pair()
    wrappers = install(model, _slices())
    saved: dict[str, list[torch.Tensor]] = {}
    ctxs = {}

    def pre(name):
        def hook(mod, args):
            ctxs[name] = torch.autograd.graph.saved_tensors_hooks(lambda t: saved[name].append(t) or t, lambda t: t)
            saved[name] = []
            ctxs[name].__enter__()

        return hook

    def post(name):
        return lambda mod, args, out: ctxs[name].__exit__(None, None, None)

    for name, w in wrappers.items():
        w.register_forward_pre_hook(pre(name))
        w.register_forward_hook(post(name))
    b, t = 2, 10
    ids = _ids(b, t)
    model(ids, labels=ids).loss.backward()
    frozen = {id(p) for p in model.parameters()}
    for s in _slices():
        w = wrappers[s.module]
        acts = [x for x in saved[s.module] if id(x) not in frozen and x is not w.weight]
        nbytes = sum(x.untyped_storage().nbytes() for x in acts)
        if s.feature == "in":
            assert nbytes == b * t * s.numel_features * 4, s.module
        else:
            assert nbytes >= b * t * w.in_features * 4, s.module


def test_uninstall_restores_base_bit_exactly_or_merges():
    model, _ = _pair()
    before = _state(model)
    install(model, _slices())
    opt = torch.optim.AdamW(block_param_groups(model, weight_decay=0.1), lr=1e-2)
    ids = _ids()
    model(ids, labels=ids).loss.backward()
    opt.step()
    trained = {k: v.clone() for k, v in trainable_state(model).items()}
    assert all(v.abs().max() > 0 for v in trained.values())
    assert not installed(uninstall(model, merge=False) and model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.requires_grad for p in model.parameters())
    assert all(type(m) is not S2Linear for m in model.modules())
    # merge=True leaves plain modules holding base + delta at the blocks (one fp32 add)
    install(model, _slices(), init={s.module: [v] for s, v in zip(_slices(), trained.values())})
    uninstall(model, merge=True)
    mods = dict(model.named_modules())
    for s, v in zip(_slices(), trained.values()):
        assert isinstance(mods[s.module], nn.Linear)
        dim = 0 if s.feature == "out" else 1
        base = gather_runs(before[f"{s.module}.weight"], s.runs, dim=dim)
        assert torch.equal(gather_runs(mods[s.module].weight, s.runs, dim=dim), base + v)


def test_bf16_base_gets_fp32_master_deltas():
    model, _ = _pair(torch.bfloat16)
    install(model, _slices())
    blocks = block_parameters(model)
    assert all(p.dtype == torch.float32 and p.is_contiguous() and not p.any() for p in blocks)
    ids = _ids()
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in blocks)
    # updates far below the weights' bf16 resolution add up in the fp32 delta and reach the forward at once
    w = installed(model)["model.layers.0.self_attn.o_proj"]
    base = w.base_block(0).float()
    with torch.no_grad():
        before = model(ids).logits.float()
        for _ in range(8):
            w.deltas[0].add_(base.abs() * 2**-12)
        after = model(ids).logits.float()
    assert not torch.equal(before, after)
    assert torch.equal(w.deltas[0], base.abs() * 2**-12 * 8)
    # the weight itself is never written: the delta is the one place the update lives
    assert torch.equal(w.base_block(0).float(), base)


def test_state_dict_is_the_stock_model_merged_or_split_on_request():
    model, ref = _pair()
    install(model, _slices())
    with torch.no_grad():
        for p in block_parameters(model):
            p.normal_()
    merged = model.state_dict()
    assert set(merged) == set(ref.state_dict())  # stock keys: save_pretrained writes a stock checkpoint
    mods = dict(model.named_modules())
    for s in _slices():
        dim = 0 if s.feature == "out" else 1
        d = installed(model)[s.module].deltas[0]
        want = gather_runs(ref.get_submodule(s.module).weight, s.runs, dim=dim) + d.detach()
        assert torch.equal(gather_runs(merged[f"{s.module}.weight"], s.runs, dim=dim), want)
        assert torch.equal(mods[s.module].weight, ref.get_submodule(s.module).weight)  # base untouched
    with state_dict_form("split"):
        split = model.state_dict()
    assert set(split) - set(ref.state_dict()) == {f"{s.module}.delta_0" for s in _slices()}
    assert set(trainable_state_dict(model)) == {f"{s.module}.delta_0" for s in _slices()}
    # a stock model loading the merged form computes the trained function
    ids = _ids()
    ref.load_state_dict(merged)
    with torch.no_grad():
        assert _rel(ref(ids).logits, model(ids).logits) <= 1e-5
    # and a freshly installed model loading it recovers the deltas (merged form split back)
    fresh, _ = _pair()
    install(fresh, _slices())
    fresh.load_state_dict(merged)
    for a, b in zip(block_parameters(fresh), block_parameters(model)):
        assert _rel(a, b) <= 1e-5
    with torch.no_grad():
        assert _rel(fresh(ids).logits, model(ids).logits) <= 1e-5
    with pytest.raises(ValueError, match="form"), state_dict_form("stock"):
        pass


def test_gpt2_conv1d():
    cfg = transformers.GPT2Config(
        vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = perturb(transformers.GPT2LMHeadModel(cfg))
    ref = transformers.GPT2LMHeadModel(cfg)
    ref.load_state_dict(model.state_dict())
    slices = [
        BlockSlice("transformer.h.0.attn.c_proj", "o", "in", [(0, 8), (24, 32)], list(range(16))),
        BlockSlice("transformer.h.1.mlp.c_fc", "up", "out", [(10, 20)], list(range(10))),
        BlockSlice("transformer.h.1.attn.c_attn", "v", "out", [(64, 72)], list(range(8))),
    ]
    wrappers = install(model, slices)
    assert all(w.transposed for w in wrappers.values())
    ids = _ids()
    model(ids, labels=ids).loss.backward()
    ref(ids, labels=ids).loss.backward()
    mods = dict(ref.named_modules())
    for s in slices:
        full = mods[s.module].weight.grad.t()  # Conv1D stores [in, out]
        g = gather_runs(full, s.runs, dim=0 if s.feature == "out" else 1)
        assert _rel(wrappers[s.module].deltas[0].grad, g) <= 1e-5
    uninstall(model, merge=False)
    assert torch.equal(model.transformer.h[0].attn.c_proj.weight, ref.transformer.h[0].attn.c_proj.weight)


@pytest.mark.parametrize(
    "bad, match",
    [
        (
            [BlockSlice("model.layers.9.mlp.down_proj", "down", "in", [(0, 4)], [0, 1, 2, 3])],
            "not in the model",
        ),
        ([BlockSlice("model.embed_tokens", "x", "in", [(0, 4)], [0, 1, 2, 3])], "nn.Linear"),
        ([BlockSlice("model.layers.0.mlp.down_proj", "down", "in", [(40, 50)], list(range(10)))], "outside"),
        (
            [BlockSlice("model.layers.0.mlp.up_proj", "up", "out", [(0, 4), (2, 6)], list(range(8)))],
            "overlap",
        ),
        ([], "nothing to train"),
    ],
)
def test_bad_plans_leave_model_untouched(bad, match):
    model, _ = _pair()
    before = _state(model)
    types = [type(m) for m in model.modules()]
    with pytest.raises(S2InstallError, match=match):
        install(model, [*_slices()[:1], *bad] if bad else bad)
    assert [type(m) for m in model.modules()] == types
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def test_double_install_and_bad_init_blocks():
    model, _ = _pair()
    s = _slices()[:1]
    good = torch.zeros(32, 16)
    for init, match in (
        ({s[0].module: [good.double()]}, "float64"),
        ({s[0].module: [good.to("meta")]}, "meta"),
        ({s[0].module: [torch.zeros(32, 15)]}, "shape"),
        ({"model.layers.1.mlp.up_proj": [good]}, "without slices"),
    ):
        with pytest.raises(S2InstallError, match=match):
            install(model, s, init=init)
        assert not installed(model) and all(p.requires_grad for p in model.parameters())
    base = gather_runs(model.model.layers[0].self_attn.o_proj.weight, s[0].runs, dim=1).clone()
    install(model, s, init={s[0].module: [good + 1]})
    merged = installed(model)[s[0].module].merged_weight()
    assert torch.equal(gather_runs(merged, s[0].runs, dim=1), base + 1)
    with pytest.raises(S2InstallError, match="already installed"):
        install(model, s)
    uninstall(model)
    with pytest.raises(S2InstallError, match="no S2 blocks"):
        uninstall(model)


def test_plan_for_another_model_is_refused():
    model, _ = _pair()
    plan = S2Plan(fingerprint="0" * 16, model_type="llama", permutations={}, selected={}, slices=_slices())
    with pytest.raises(PlanError, match="different model"):
        install(model, plan)
    assert not installed(model)
    plan.fingerprint = model_fingerprint(model)
    assert set(install(model, plan)) == {s.module for s in _slices()}


def test_torch_compile_fullgraph_sees_optimizer_updates():
    model, ref = _pair()
    install(model, _slices())
    ids = _ids()

    def loss_fn(t):
        return model(t, labels=t).loss

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")  # fullgraph: no graph breaks
    compiled(ids).backward()
    ref(ids, labels=ids).loss.backward()
    for p, g in zip(block_parameters(model), _full_block_grads(ref, _slices())):
        assert _rel(p.grad, g) <= 1e-5
    opt = torch.optim.SGD(block_parameters(model), lr=1.0)
    opt.step()
    before = ref(ids, labels=ids).loss
    after = compiled(ids)  # same grad mode: no recompile; the compiled graph must sync the updated blocks
    assert _rel(after, loss_fn(ids)) <= 1e-6 and _rel(after, before) > 1e-4

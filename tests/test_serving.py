"""Multi-adapter batched serving: Triton kernel vs torch reference, and per-row equality with merged runs."""

from __future__ import annotations

import pytest
import torch

from benchmarks.tiny_models import tiny_model
from s2ft_lightning.adapters import Adapter, AdapterError, BlockDelta, diff_adapter, merge_adapter
from s2ft_lightning.adapters.serving import MultiAdapterModel, PackedBlocks, block_term_torch, block_term_triton


def _packed_case(out_f: int, in_f: int, ks: list[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ads = []
    for k in ks:
        blocks = []
        if k:
            kc, kr = min(k, in_f), min(k, out_f)
            cols = torch.randperm(in_f, generator=g)[:kc].tolist()
            rows = torch.randperm(out_f, generator=g)[:kr].tolist()
            blocks.append(BlockDelta("m", "in", cols, 0.1 * torch.randn(out_f, kc, generator=g)))
            blocks.append(BlockDelta("m", "out", rows, 0.1 * torch.randn(kr, in_f, generator=g)))
        ads.append(Adapter(blocks, "fp", {"m": (out_f, in_f)}, {"m": "linear"}))
    return ads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("feature", ["in", "out"])
@pytest.mark.parametrize("shape", [(67, 45, 19, [5, 0, 33, 17]), (130, 97, 1, [70, 3]), (33, 150, 40, [0, 129])])
def test_triton_kernel_matches_torch_reference(dtype, feature, shape):
    out_f, in_f, T, ks = shape
    ads = _packed_case(out_f, in_f, ks)
    p = PackedBlocks(feature, ads, "m", (out_f, in_f), "cpu")
    names = list(range(len(ads))) + [-1]
    aid = torch.tensor(names, dtype=torch.int32)
    slots = torch.where(aid < 0, len(ads), aid).long()
    B = len(names)
    x = torch.randn(B, T, in_f).to(dtype)
    y = torch.randn(B, T, out_f).to(dtype)
    ref = block_term_torch(y, x, slots, p)
    got = block_term_triton(y.clone(), x, aid, p)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(got.float(), ref.float(), atol=tol, rtol=tol)
    for b, k in enumerate(ks + [0]):  # untouched outputs keep their exact bits (no stray writes)
        if k == 0:
            assert torch.equal(got[b], y[b])
        elif feature == "out":
            untouched = torch.ones(out_f, dtype=torch.bool)
            untouched[ads[b].block("m", "out").indices] = False
            assert torch.equal(got[b][..., untouched], y[b][..., untouched])


def _serving_adapters(model, n: int = 3):
    """Adapters on o/v/down/up of a tiny llama, at random original indices, with random deltas."""
    g = torch.Generator().manual_seed(7)
    ads = {}
    for i in range(n):
        targets = {}
        for layer in range(2):
            p = f"model.layers.{layer}"
            targets[f"{p}.self_attn.o_proj"] = {"in": torch.randperm(32, generator=g)[:8].tolist()}
            targets[f"{p}.mlp.down_proj"] = {"in": torch.randperm(48, generator=g)[:6].tolist()}
            if i != 1:  # adapter 1 trains columns only
                targets[f"{p}.self_attn.v_proj"] = {"out": torch.randperm(16, generator=g)[:8].tolist()}
                targets[f"{p}.mlp.up_proj"] = {"out": torch.randperm(48, generator=g)[:5].tolist()}
        ad = diff_adapter(model, model, targets, name=f"ad{i}")
        for b in ad.blocks:
            b.delta = 0.2 * torch.randn(b.delta.shape, generator=g)
        ads[f"ad{i}"] = ad
    return ads


def _kw():
    return {"num_key_value_heads": 2}


@pytest.mark.parametrize(
    "backend,names",
    [
        ("torch", ["ad2", None, "ad0", "ad1", "ad0"]),
        ("torch", ["ad0", "ad1", "ad2"]),  # row i uses adapter i: the no-copy path
        ("triton", ["ad2", None, "ad0", "ad1", "ad0"]),
    ],
)
def test_each_row_equals_running_it_alone_with_its_adapter_merged(backend, names):
    model = tiny_model("llama", seed=0, **_kw())
    ads = _serving_adapters(model)
    ids = torch.randint(0, 128, (len(names), 11))
    mam = MultiAdapterModel(model, ads, backend=backend)
    with torch.no_grad():
        got = mam(input_ids=ids, adapter_names=names).logits
        plain = model(ids).logits  # outside `use`, the base is untouched
    for row, name in enumerate(names):
        ref_model = tiny_model("llama", seed=0, **_kw())
        if name is not None:
            merge_adapter(ref_model, ads[name])
        with torch.no_grad():
            want = ref_model(ids[row : row + 1]).logits[0]
        torch.testing.assert_close(got[row], want, atol=1e-5, rtol=1e-5)
    for row, name in enumerate(names):
        if name is None:
            assert torch.equal(got[row], plain[row])
    assert (got[0] - plain[0]).abs().max() > 1e-3
    mam.close()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain)


def test_generate_with_per_row_adapters():
    model = tiny_model("llama", seed=0, **_kw())
    ads = _serving_adapters(model, n=2)
    mam = MultiAdapterModel(model, ads, backend="torch")
    prompt = torch.randint(0, 128, (2, 5))
    with mam.use(["ad1", "ad0"]), torch.no_grad():
        out = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    for row, name in enumerate(["ad1", "ad0"]):
        ref = tiny_model("llama", seed=0, **_kw())
        merge_adapter(ref, ads[name])
        with torch.no_grad():
            want = ref.generate(prompt[row : row + 1], max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(out[row], want[0])


def test_serving_refusals():
    model = tiny_model("llama", seed=0, **_kw())
    ads = _serving_adapters(model, n=1)
    with pytest.raises(AdapterError, match="ad0"):
        MultiAdapterModel(tiny_model("llama", seed=3, **_kw()), ads)
    mam = MultiAdapterModel(model, ads, backend="torch")
    with pytest.raises(AdapterError, match="unknown adapter"):
        mam(input_ids=torch.zeros(1, 3, dtype=torch.long), adapter_names=["nope"])
    with pytest.raises(RuntimeError, match="adapter names"):
        mam(input_ids=torch.zeros(2, 3, dtype=torch.long), adapter_names=["ad0"])
    with pytest.raises(ValueError, match="backend"):
        MultiAdapterModel(model, ads, backend="cuda")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gpt2_conv1d_rows_and_columns(backend):
    model = tiny_model("gpt2", seed=0)
    g = torch.Generator().manual_seed(2)
    ads = {}
    for i in range(2):
        targets = {
            "transformer.h.0.attn.c_proj": {"in": torch.randperm(32, generator=g)[:8].tolist()},
            "transformer.h.1.mlp.c_fc": {"out": torch.randperm(48, generator=g)[:7].tolist()},
        }
        ad = diff_adapter(model, model, targets, name=f"g{i}")
        for b in ad.blocks:
            b.delta = 0.2 * torch.randn(b.delta.shape, generator=g)
        ads[f"g{i}"] = ad
    names = ["g1", "g0", None]
    ids = torch.randint(0, 128, (3, 6))
    with torch.no_grad():
        got = MultiAdapterModel(model, ads, backend=backend)(input_ids=ids, adapter_names=names).logits
    for row, name in enumerate(names):
        ref = tiny_model("gpt2", seed=0)
        if name is not None:
            merge_adapter(ref, ads[name])
        with torch.no_grad():
            torch.testing.assert_close(got[row], ref(ids[row : row + 1]).logits[0], atol=1e-5, rtol=1e-5)


def test_serving_under_autograd_gives_gradients_or_refuses(monkeypatch):
    """The Triton term has no backward: with gradients needed, auto serves with the torch term, triton refuses."""
    monkeypatch.setenv("S2FT_KERNELS", "auto")  # TRITON_INTERPRET=1 (conftest): auto picks Triton on CPU
    model = tiny_model("llama", seed=0, **_kw())
    ads = _serving_adapters(model, n=2)
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    grads = {}
    for name in ("ad0", "ad1"):  # reference: each adapter merged alone, gradient of the row's loss
        ref = tiny_model("llama", seed=0, **_kw())
        merge_adapter(ref, ads[name])
        row = ids[[0 if name == "ad0" else 1]]
        ref(input_ids=row, labels=row).loss.backward()
        grads[name] = ref.get_input_embeddings().weight.grad
    mam = MultiAdapterModel(model, ads)  # auto
    for i, name in enumerate(("ad0", "ad1")):
        model.zero_grad()
        row = ids[[i]]
        mam(input_ids=row, labels=row, adapter_names=[name]).loss.backward()
        torch.testing.assert_close(model.get_input_embeddings().weight.grad, grads[name], atol=1e-5, rtol=1e-4)
    forced = MultiAdapterModel(tiny_model("llama", seed=0, **_kw()), ads, backend="triton")
    with pytest.raises(RuntimeError, match="no backward"):
        forced(input_ids=ids, labels=ids, adapter_names=["ad0", "ad1"])
    with torch.no_grad():
        served = forced(input_ids=ids, adapter_names=["ad0", "ad1"]).logits
        want = mam(input_ids=ids, adapter_names=["ad0", "ad1"]).logits
    torch.testing.assert_close(served, want, atol=1e-5, rtol=1e-5)

"""Merge / unmerge / switch bit-exactly in bf16, and adapter fusion with overlap handling."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from s2ft_lightning.adapters import Adapter, AdapterBank, AdapterError, diff_adapter, fuse_adapters, merge_adapter


class Tiny(nn.Module):
    """Three small modules, one of them a GPT-2 Conv1D (weight stored [in, out])."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(12, 10)
        self.b = nn.Linear(10, 14, bias=False)
        self.c = Conv1D(9, 14)  # in 14, out 9


def _model(dtype=torch.bfloat16, seed=0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny().to(dtype)


def _adapter(model: nn.Module, targets: dict, seed: int, scale: float = 0.05) -> Adapter:
    """An adapter at ``targets`` with random fp32 deltas (base hashes taken from ``model``)."""
    ad = diff_adapter(model, model, targets, name=f"s{seed}")
    g = torch.Generator().manual_seed(seed)
    for b in ad.blocks:
        b.delta = scale * torch.randn(b.delta.shape, generator=g)
    return ad


SPECS = {
    "rows_a": {"a": {"out": [1, 4, 7]}, "c": {"in": [0, 13]}},
    "cols_a": {"a": {"in": [0, 4, 11]}, "b": {"out": [2, 3]}},
    "overlap": {"a": {"out": [4, 9], "in": [4, 5]}, "c": {"out": [8, 0]}},
    "other": {"b": {"in": [9, 0, 5]}, "c": {"in": [13, 2]}},
}


def _adapters(model):
    return {n: _adapter(model, spec, seed=i) for i, (n, spec) in enumerate(SPECS.items())}


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _lw(model, name):
    m = model.get_submodule(name)
    return m.weight.t() if isinstance(m, Conv1D) else m.weight


def test_merge_adds_in_fp32_and_casts_once():
    model = _model()
    base = _weights(model)
    ad = _adapter(model, {"a": {"out": [1, 4]}, "c": {"in": [3]}}, seed=1)
    merge_adapter(model, ad)
    want_a = base["a.weight"].clone()
    want_a[[1, 4]] = (base["a.weight"][[1, 4]].float() + ad.block("a", "out").delta).to(torch.bfloat16)
    assert torch.equal(model.a.weight, want_a)
    want_c = base["c.weight"].clone()  # Conv1D [in, out]: logical column 3 is stored row 3
    want_c[3] = (base["c.weight"][3].float() + ad.block("c", "in").delta[:, 0]).to(torch.bfloat16)
    assert torch.equal(model.c.weight, want_c)
    assert torch.equal(model.b.weight, base["b.weight"]) and torch.equal(model.a.bias, base["a.bias"])


def test_thousand_cycles_leave_base_bit_identical_and_state_history_free():
    model = _model()
    base = _weights(model)
    ads = _adapters(model)
    bank = AdapterBank(model)
    for n, a in ads.items():
        bank.add(a, n)
    rng = random.Random(0)
    names = list(ads)
    for step in range(1000):
        op = rng.choice(["merge", "unmerge", "switch"])
        if op == "merge":
            free = [n for n in names if n not in bank.merged]
            if free:
                bank.merge(rng.choice(free), scale=rng.choice([1.0, 0.5, 2.0]))
        elif op == "unmerge" and bank.merged:
            bank.unmerge(rng.choice(bank.merged) if rng.random() < 0.5 else None)
        else:
            bank.switch(rng.choice(names))
        if step % 250 == 0:  # the merged weights depend only on what is merged, not on the history
            fresh = _model()
            fb = AdapterBank(fresh)
            for n, s in bank.active:
                fb.add(ads[n], n)
                fb.merge(n, s)
            assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in model.state_dict().items())
        if not bank.merged:
            assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())
    bank.unmerge()
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())
    for n in list(ads):
        bank.remove(n)
    assert not bank._saved and all(torch.equal(v, base[k]) for k, v in model.state_dict().items())


def test_switch_touches_only_the_union_and_equals_a_fresh_merge():
    model = _model()
    ads = _adapters(model)
    bank = AdapterBank(model)
    for n, a in ads.items():
        bank.add(a, n)
    bank.merge("rows_a")
    before = _weights(model)
    bank.switch("cols_a")
    allowed = {}
    for a in (ads["rows_a"], ads["cols_a"]):
        for b in a.blocks:
            mask = allowed.setdefault(b.module, torch.zeros(_lw(model, b.module).shape, dtype=torch.bool))
            if b.feature == "out":
                mask[b.indices] = True
            else:
                mask[:, b.indices] = True
    for name in ("a", "b", "c"):
        m = model.get_submodule(name)
        changed = _lw(model, name) != (
            before[f"{name}.weight"].t() if isinstance(m, Conv1D) else before[f"{name}.weight"]
        )
        assert not (changed & ~allowed.get(name, torch.zeros_like(changed))).any()
    fresh = _model()
    merge_adapter(fresh, ads["cols_a"])
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in model.state_dict().items())


def test_stacked_merge_with_row_column_overlap_matches_fp32_sum():
    model = _model(torch.float32)
    base = _weights(model)
    ads = _adapters(model)
    bank = AdapterBank(model)
    for n in ("rows_a", "cols_a", "overlap"):
        bank.add(ads[n], n)
        bank.merge(n)
    want = base["a.weight"].clone()
    for n in ("rows_a", "cols_a", "overlap"):
        for b in ads[n].blocks:
            if b.module == "a":
                if b.feature == "out":
                    want[b.indices] += b.delta
                else:
                    want[:, b.indices] += b.delta
    torch.testing.assert_close(model.a.weight, want, atol=1e-6, rtol=0)
    bank.unmerge("cols_a")  # the others stay merged, the base comes back where only cols_a was
    bank.unmerge()
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())


def test_bank_refusals_leave_model_untouched():
    model = _model()
    base = _weights(model)
    ads = _adapters(model)
    bank = AdapterBank(model)
    bank.add(ads["rows_a"], "x")
    bank.merge("x")
    bank.add(ads["overlap"], "y")  # verified against base values even though "x" is merged there
    merged = _weights(model)
    with pytest.raises(AdapterError, match="already merged"):
        bank.merge("x")
    with pytest.raises(AdapterError, match="no adapter named"):
        bank.switch("nope")
    with pytest.raises(AdapterError, match="not merged"):
        bank.unmerge("y")
    with pytest.raises(AdapterError, match="already registered"):
        bank.add(ads["other"], "x")
    other_base = _model(seed=1)
    with pytest.raises(AdapterError, match="base weights"):
        AdapterBank(other_base).add(ads["rows_a"])
    assert all(torch.equal(v, merged[k]) for k, v in model.state_dict().items())
    bank.unmerge()
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())


def test_fuse_sum_weighted_and_overlap_report():
    model = _model(torch.float32)
    ads = _adapters(model)
    fused, report = fuse_adapters({"r": ads["rows_a"], "o": ads["other"]})
    # disjoint except the Conv1D column 13, shared by both
    assert report.overlaps == {"c.cols": {13: ["r", "o"]}} and report.num_overlapping == 1
    for name in ("rows_a", "other"):
        for b in ads[name].blocks:
            fb = fused.block(b.module, b.feature)
            for j, i in enumerate(b.indices):
                if (b.module, i) == ("c", 13):
                    continue
                got = fb.delta[fb.indices.index(i)] if b.feature == "out" else fb.delta[:, fb.indices.index(i)]
                want = b.delta[j] if b.feature == "out" else b.delta[:, j]
                assert torch.equal(got, want)
    c13 = fused.block("c", "in")
    both = ads["rows_a"].block("c", "in").delta[:, 1] + ads["other"].block("c", "in").delta[:, 0]
    assert torch.allclose(c13.delta[:, c13.indices.index(13)], both)
    w_fused, _ = fuse_adapters({"r": ads["rows_a"], "o": ads["other"]}, weights=[0.5, -2.0])
    wb = w_fused.block("a", "out")
    assert torch.allclose(wb.delta, 0.5 * ads["rows_a"].block("a", "out").delta)
    mean, rep = fuse_adapters({"r": ads["rows_a"], "o": ads["other"]}, overlap="mean")
    mb = mean.block("c", "in")
    assert torch.allclose(mb.delta[:, mb.indices.index(13)], both / 2) and "mean" in rep.summary()


def test_fused_merge_equals_sequential_merges_and_cross_mean():
    model = _model(torch.float32)
    ads = _adapters(model)
    fused, report = fuse_adapters([ads["rows_a"], ads["cols_a"]], name="f")
    assert report.cross == {"a": 9}  # rows {1,4,7} x columns {0,4,11}
    seq, one = _model(torch.float32), _model(torch.float32)
    bank = AdapterBank(seq)
    for n in ("rows_a", "cols_a"):
        bank.add(ads[n], n)
        bank.merge(n)
    merge_adapter(one, fused)  # the fused adapter keeps the base checks of its parts
    for k, v in seq.state_dict().items():
        torch.testing.assert_close(one.state_dict()[k], v, atol=1e-6, rtol=0)
    mean, _ = fuse_adapters([ads["rows_a"], ads["cols_a"]], overlap="mean")
    m = _model(torch.float32)
    base = m.a.weight.detach().clone()
    merge_adapter(m, mean)
    r, c = ads["rows_a"].block("a", "out"), ads["cols_a"].block("a", "in")
    got = m.a.weight[4, 4] - base[4, 4]  # element in row 4 and column 4: the mean of both deltas
    want = (r.delta[r.indices.index(4), 4] + c.delta[4, c.indices.index(4)]) / 2
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    with pytest.raises(AdapterError, match="overlap"):
        fuse_adapters([ads["rows_a"]], overlap="max")


def test_switch_stack_and_unstack_agree_with_a_fresh_merge_on_runs_and_scattered_indices():
    """One adapter alone uses its precomputed values; stacked ones are composed; both write the same way."""
    model = _model()
    base = _weights(model)
    specs = {
        "runs": {"a": {"in": [3, 4, 5, 6]}, "b": {"out": [0, 1, 2, 8, 9]}, "c": {"in": [2, 3]}},
        "scattered": {"a": {"in": [0, 2, 4, 6, 8, 10], "out": [1, 3, 5, 7, 9]}, "c": {"out": [0, 2, 4, 6, 8]}},
    }
    ads = {n: _adapter(model, spec, seed=10 + i) for i, (n, spec) in enumerate(specs.items())}
    bank = AdapterBank(model)
    for n, a in ads.items():
        bank.add(a, n)
    for name, scale in [("runs", 1.0), ("scattered", 1.0), ("scattered", 0.5), ("runs", 2.0)]:
        bank.switch(name, scale)
        alone = _weights(model)
        other = "runs" if name == "scattered" else "scattered"
        bank.merge(other)  # both merged: composed values at each adapter's positions
        bank.unmerge(other)  # back to `name` alone
        assert all(torch.equal(v, alone[k]) for k, v in model.state_dict().items())
        fresh = _model()
        merge_adapter(fresh, ads[name], scale)
        assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in model.state_dict().items())
    bank.unmerge()
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())


def test_switch_after_the_model_is_cast_recomputes_exactly():
    model = _model()
    ads = _adapters(model)
    bank = AdapterBank(model)
    for n in ("rows_a", "other"):
        bank.add(ads[n], n)
    bank.switch("rows_a")
    bank.unmerge()
    model.float()  # precomputed bf16 values no longer fit: the bank must recompute, not copy stale bytes
    base = _weights(model)
    bank.switch("other")
    fresh = _model().float()
    merge_adapter(fresh, ads["other"])
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in model.state_dict().items())
    assert model.c.weight.dtype == torch.float32
    bank.unmerge()
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("scale", [0.37, -2.5])
def test_merge_at_a_scale_equals_base_plus_scale_times_delta(scale):
    """Checked against an independent reference: float64 base + scale·Δ at each touched element (rows and
    columns crossing included), cast to the weight dtype; every other element bit-identical."""
    model = _model(torch.float32)
    base = _weights(model)
    ad = _adapter(model, SPECS["overlap"], seed=3, scale=0.5)
    merge_adapter(model, ad, scale=scale)
    for name in ("a", "b", "c"):
        want = _lw(_model(torch.float32), name).detach().double().clone()
        for b in ad.blocks:
            if b.module != name:
                continue
            idx = torch.tensor(b.indices)
            if b.feature == "out":
                want[idx] += scale * b.delta.double()
            else:
                want[:, idx] += scale * b.delta.double()
        got = _lw(model, name).detach()
        torch.testing.assert_close(got, want.float(), atol=2e-7, rtol=2e-7)
        touched = torch.zeros_like(got, dtype=torch.bool)
        for b in ad.blocks:
            if b.module == name and b.feature == "out":
                touched[b.indices, :] = True
            elif b.module == name:
                touched[:, b.indices] = True
        assert torch.equal(got[~touched], _lw(_model(torch.float32), name).detach()[~touched])
    assert any(not torch.equal(v, base[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_scale_whose_merge_overflows_is_refused_before_anything_is_written(dtype):
    model = _model(dtype)
    base = _weights(model)
    ad = _adapter(model, SPECS["rows_a"], seed=1)
    with pytest.raises(AdapterError, match="not finite .* nothing was written"):
        merge_adapter(model, ad, scale=1e39)  # finite as a float, inf once multiplied into fp32/bf16
    bank = AdapterBank(model)
    bank.add(ad, "x")
    bank.merge("x")
    merged = _weights(model)
    with pytest.raises(AdapterError, match="not finite"):
        bank.switch("x", scale=-1e39)
    assert all(torch.equal(v, merged[k]) for k, v in model.state_dict().items())
    bank.unmerge()
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())

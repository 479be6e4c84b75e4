"""S²FT adapters exported as exact PEFT LoRA adapters: stock PEFT loads, merges and serves them unchanged."""

from __future__ import annotations

import json

import pytest
import torch

peft = pytest.importorskip("peft")

from tiny_models import trained_tiny  # noqa: E402

from benchmarks.tiny_models import tiny_model  # noqa: E402
from s2ft_lightning.adapters import (  # noqa: E402
    AdapterError,
    diff_adapter,
    export_peft_lora,
    extract_adapter,
    fuse_adapters,
    lora_factors,
    merge_adapter,
    save_adapter,
)

CASES = {
    "llama_gqa": ("llama", {"num_key_value_heads": 2}),  # o/down columns, v/up rows, GQA runs
    "gpt2_conv1d": ("gpt2", {}),  # Conv1D: fan_in_fan_out, fused c_attn rows
    "phi3_fused": ("phi3", {}),  # fused qkv_proj and gate_up_proj rows
}
IDS = torch.randint(0, 128, (3, 9), generator=torch.Generator().manual_seed(3))


def _trained(model_type: str, kw: dict, seed: int = 1, dtype=torch.float32):
    model, plan = trained_tiny(model_type, kw, seed, dtype)
    return model, extract_adapter(model, plan, name=f"s{seed}")


def _logits(model, ids=IDS):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_loads_the_export_and_computes_the_trained_function(case, tmp_path):
    model_type, kw = CASES[case]
    trained, adapter = _trained(model_type, kw)
    ranks = export_peft_lora(adapter, tmp_path / "lora")
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["fan_in_fan_out"] == (model_type == "gpt2")
    assert set(cfg["target_modules"]) == set(adapter.modules) == set(ranks)
    served = peft.PeftModel.from_pretrained(tiny_model(model_type, seed=0, **kw), tmp_path / "lora")
    want = _logits(trained)
    torch.testing.assert_close(_logits(served), want, atol=1e-5, rtol=1e-5)
    # merge_and_unload gives our merged export: the same fp32 add at the same positions
    merged = served.merge_and_unload()
    ours = tiny_model(model_type, seed=0, **kw)
    merge_adapter(ours, adapter)
    for (name, a), b in zip(merged.state_dict().items(), ours.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)


def test_bf16_export_is_within_bf16_rounding(tmp_path):
    trained, adapter = _trained("llama", {"num_key_value_heads": 2}, dtype=torch.bfloat16)
    export_peft_lora(adapter, tmp_path / "lora")
    base = tiny_model("llama", seed=0, num_key_value_heads=2).to(torch.bfloat16)
    served = peft.PeftModel.from_pretrained(base, tmp_path / "lora")
    got, want = _logits(served).float(), _logits(trained).float()
    rel = float((got - want).abs().max() / want.abs().max())
    assert rel <= 2e-2, rel  # bf16: the LoRA term is computed in fp32 adapters over a bf16 base


def test_several_exports_side_by_side_and_in_one_mixed_batch(tmp_path):
    kw = {"num_key_value_heads": 2}
    runs = {f"s{seed}": _trained("llama", kw, seed=seed) for seed in (1, 2, 3)}
    for name, (_, adapter) in runs.items():
        export_peft_lora(adapter, tmp_path / name)
    served = peft.PeftModel.from_pretrained(tiny_model("llama", seed=0, **kw), tmp_path / "s1", adapter_name="s1")
    for name in ("s2", "s3"):
        served.load_adapter(tmp_path / name, adapter_name=name)
    for name, (trained, _) in runs.items():
        served.set_adapter(name)
        torch.testing.assert_close(_logits(served), _logits(trained), atol=1e-5, rtol=1e-5)
    names = ["s1", "s2", "s3"]
    with torch.no_grad():
        mixed = served.eval()(input_ids=IDS, adapter_names=names).logits
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i], _logits(runs[name][0])[i], atol=1e-5, rtol=1e-5)


def test_fused_rows_and_columns_and_scattered_indices(tmp_path):
    base = tiny_model("llama", seed=0, num_key_value_heads=2)
    tuned = tiny_model("llama", seed=0, num_key_value_heads=2)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    targets = {
        "model.layers.0.mlp.down_proj": {"in": [0, 3, 7, 40], "out": [1, 5]},  # rows and columns cross
        "model.layers.1.self_attn.o_proj": {"in": [2, 9, 31]},  # non-contiguous columns
        "model.layers.1.mlp.up_proj": {"out": [0, 47]},
    }
    cols = diff_adapter(base, tuned, {m: {f: i for f, i in t.items() if f == "in"} for m, t in targets.items()})
    rows = diff_adapter(base, tuned, {m: {f: i for f, i in t.items() if f == "out"} for m, t in targets.items()})
    fused, _ = fuse_adapters({"c": cols, "r": rows})
    a, b = lora_factors(fused)["model.layers.0.mlp.down_proj"]
    assert a.shape[0] == b.shape[1] == 6  # stacked: 4 columns + 2 rows
    ranks = export_peft_lora(fused, tmp_path / "lora")
    assert ranks == {"model.layers.0.mlp.down_proj": 6, "model.layers.1.self_attn.o_proj": 3,
                     "model.layers.1.mlp.up_proj": 2}  # fmt: skip
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] and cfg["alpha_pattern"] == cfg["rank_pattern"]  # per-module rank, scaling 1
    want = tiny_model("llama", seed=0, num_key_value_heads=2)
    merge_adapter(want, fused)
    served = peft.PeftModel.from_pretrained(tiny_model("llama", seed=0, num_key_value_heads=2), tmp_path / "lora")
    torch.testing.assert_close(_logits(served), _logits(want), atol=1e-5, rtol=1e-5)


def test_cli_export_lora_and_its_refusals(tmp_path, capsys):
    from s2ft_lightning.adapters.cli import main

    _, adapter = _trained("llama", {"num_key_value_heads": 2})
    save_adapter(adapter, tmp_path / "ad")
    base = tmp_path / "base"
    tiny_model("llama", seed=0, num_key_value_heads=2).save_pretrained(base)
    args = ["export-lora", str(tmp_path / "ad"), "--out", str(tmp_path / "lora"), "--base", str(base)]
    assert main(args) == 0 and "PEFT LoRA" in capsys.readouterr().out
    other = tmp_path / "other"
    tiny_model("llama", seed=5, num_key_value_heads=2).save_pretrained(other)
    bad = ["export-lora", str(tmp_path / "ad"), "--out", str(tmp_path / "x"), "--base", str(other)]
    assert main(bad) == 2 and "base weights" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert main(["export-lora", str(tmp_path / "ad"), "--out", str(tmp_path / "y"), "--max-rank", "4"]) == 2
    err = capsys.readouterr().err
    assert "above --max-rank 4" in err and "needs LoRA rank" in err and not (tmp_path / "y").exists()
    with pytest.raises(AdapterError, match="max-rank"):
        export_peft_lora(adapter, tmp_path / "z", max_rank=1)


def test_a_global_budget_whose_last_expert_trains_nothing_exports_every_expert(tmp_path):
    """The export lays out every expert of the tensor (recorded at extraction), not up to the last trained one:
    PEFT refused the file (A [14, 48] vs [16, 48])."""
    from s2ft_lightning import S2Config, layers, prepare_model

    model = tiny_model("mixtral")
    plan = prepare_model(model, S2Config(d_ratio=0.05, allocation="global", seed=9))
    trained = set(layers.installed(model))
    assert "model.layers.0.mlp.experts.down_proj[3]" not in trained  # the case: layer 0's last expert is untrained
    assert "model.layers.0.mlp.experts.down_proj[0]" in trained
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in layers.block_parameters(model):
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    adapter = extract_adapter(model, plan)
    assert adapter.metadata["expert_counts"]["model.layers.0.mlp.experts.down_proj"] == 4
    export_peft_lora(adapter, tmp_path / "lora")
    served = peft.PeftModel.from_pretrained(tiny_model("mixtral"), tmp_path / "lora")
    torch.testing.assert_close(_logits(served), _logits(model), atol=1e-5, rtol=1e-5)
    del adapter.metadata["expert_counts"]  # an adapter that does not record it is refused, not mis-laid
    with pytest.raises(AdapterError, match="does not record how many experts"):
        export_peft_lora(adapter, tmp_path / "old")
    assert not (tmp_path / "old").exists()


@pytest.mark.parametrize(("model_type", "task"), [("bert", None), ("llama", "CAUSAL_LM")])
def test_the_task_type_follows_the_base_so_peft_serves_an_encoder(model_type, task, tmp_path):
    trained, adapter = _trained(model_type, {})
    export_peft_lora(adapter, tmp_path / "lora")
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["task_type"] == task
    served = peft.PeftModel.from_pretrained(tiny_model(model_type, seed=0), tmp_path / "lora")
    torch.testing.assert_close(_logits(served), _logits(trained), atol=1e-5, rtol=1e-5)

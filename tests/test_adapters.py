"""Adapters: extraction in original index space from the real S²FT pipeline, directory format, refusals."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import trained_tiny

from benchmarks.tiny_models import tiny_model
from s2ft_lightning.adapters import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    AdapterError,
    check_base,
    diff_adapter,
    extract_adapter,
    list_adapters,
    load_adapter,
    load_adapters,
    merge_adapter,
    save_adapter,
    save_adapters,
)

CASES = {"llama_gqa": ("llama", {"num_key_value_heads": 2}), "gpt2_conv1d": ("gpt2", {})}


def _trained(model_type: str, kw: dict, seed: int = 1):
    return trained_tiny(model_type, kw, seed)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(model, state) -> bool:
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.fixture(scope="module")
def llama_adapter():
    model, plan = _trained(*CASES["llama_gqa"])
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    return extract_adapter(model, plan, base_model="tiny-llama", name="a"), _logits(model, ids), ids


@pytest.mark.parametrize("case", list(CASES))
def test_extracted_adapter_reproduces_trained_model_on_stock_base(case, tmp_path):
    model_type, kw = CASES[case]
    model, plan = _trained(model_type, kw)
    ids = torch.randint(0, 128, (2, 9))
    want = _logits(model, ids)
    adapter = extract_adapter(model, plan, base_model=f"tiny-{model_type}")
    # original index space: the adapter's indices are the plan's original ones, not permuted positions
    assert {b.module for b in adapter.blocks} == {s.module for s in plan.slices}
    for s in plan.slices:
        assert adapter.block(s.module, s.feature).indices == s.original
    save_adapter(adapter, tmp_path / "ad")
    loaded = load_adapter(tmp_path / "ad")
    base = tiny_model(model_type, seed=0, **kw)
    assert (_logits(base, ids) - want).abs().max() > 1e-2  # the adapter matters
    merge_adapter(base, loaded)
    torch.testing.assert_close(_logits(base, ids), want, atol=1e-5, rtol=0)


def test_roundtrip_and_config_contents(llama_adapter, tmp_path):
    adapter = llama_adapter[0]
    save_adapter(adapter, tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / CONFIG_NAME).read_text())
    assert cfg["method"] == "S2FT" and cfg["base_model"] == "tiny-llama"
    assert cfg["base_fingerprint"] == adapter.base_fingerprint and cfg["dtype"] == "float32"
    assert cfg["package_version"] and cfg["format_version"] == 1 and cfg["base_values_sha256"]
    entry = cfg["modules"]["model.layers.0.mlp.down_proj"]
    assert set(entry["blocks"]) == {"in"} and entry["shape"] == [32, 48]
    loaded = load_adapter(tmp_path / "ad")
    assert loaded.name == "a" and loaded.num_params == adapter.num_params
    for b in adapter.blocks:
        lb = loaded.block(b.module, b.feature)
        assert lb.indices == b.indices and torch.equal(lb.delta, b.delta)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_multiple_named_adapters(llama_adapter, tmp_path):
    a = llama_adapter[0]
    save_adapters({"x": a, "y": a}, tmp_path / "many")
    assert list_adapters(tmp_path / "many") == ["x", "y"]
    both = load_adapters(tmp_path / "many")
    assert set(both) == {"x", "y"} and torch.equal(both["y"].blocks[0].delta, a.blocks[0].delta)
    assert load_adapter(tmp_path / "many", "x").num_params == a.num_params


def test_diff_adapter_matches_conv1d_and_linear():
    for model_type in ("gpt2", "llama"):
        base, tuned = tiny_model(model_type, seed=0), tiny_model(model_type, seed=0)
        name = "transformer.h.1.mlp.c_proj" if model_type == "gpt2" else "model.layers.1.mlp.down_proj"
        w = tuned.get_submodule(name).weight
        with torch.no_grad():
            if model_type == "gpt2":  # Conv1D weight is [in, out]: logical columns are its rows
                w[[3, 7]] += 1.0
            else:
                w[:, [3, 7]] += 1.0
        ad = diff_adapter(base, tuned, {name: {"in": [3, 7]}})
        assert torch.allclose(ad.blocks[0].delta, torch.ones(32, 2))
        merge_adapter(base, ad)
        assert torch.equal(base.get_submodule(name).weight, w)


def test_refuses_other_config_and_other_weights_leaving_model_untouched(llama_adapter):
    adapter = llama_adapter[0]
    other_cfg = tiny_model("llama", seed=0, num_key_value_heads=4)
    before = _state(other_cfg)
    with pytest.raises(AdapterError, match="fingerprint"):
        merge_adapter(other_cfg, adapter)
    assert _same_state(other_cfg, before)
    other_weights = tiny_model("llama", seed=5, num_key_value_heads=2)
    before = _state(other_weights)
    with pytest.raises(AdapterError, match="base weights"):
        merge_adapter(other_weights, adapter)
    assert _same_state(other_weights, before)
    # the same base stored in bf16 is accepted (bf16-rounded hash)
    check_base(tiny_model("llama", seed=0, num_key_value_heads=2).to(torch.bfloat16), adapter)


def test_refuses_changed_base_value_at_one_touched_position(llama_adapter):
    adapter = llama_adapter[0]
    base = tiny_model("llama", seed=0, num_key_value_heads=2)
    b = adapter.blocks[0]
    w = base.get_submodule(b.module).weight
    with torch.no_grad():
        if b.feature == "in":
            w[0, b.indices[-1]] += 1e-3
        else:
            w[b.indices[-1], 0] += 1e-3
    with pytest.raises(AdapterError, match="base weights"):
        check_base(base, adapter)


def _corrupt(path, how: str) -> None:
    wp, cp = path / WEIGHTS_NAME, path / CONFIG_NAME
    if how == "truncated":
        data = wp.read_bytes()
        wp.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        wp.write_bytes(b"\x00" * 64)
    elif how == "bitflip":
        t = load_file(str(wp))
        k = sorted(t)[0]
        t[k][0, 0] += 1.0
        save_file(t, str(wp))
    elif how == "missing_weights":
        wp.unlink()
    elif how == "missing_config":
        cp.unlink()
    elif how == "bad_json":
        cp.write_text(cp.read_text()[:50])
    else:
        cfg = json.loads(cp.read_text())
        mod = cfg["modules"]["model.layers.0.mlp.down_proj"]["blocks"]["in"]
        if how == "index_out_of_range":
            mod["indices"][0] = 48
        elif how == "duplicate_index":
            mod["indices"][1] = mod["indices"][0]
        elif how == "wrong_method":
            cfg["method"] = "LoRA"
        elif how == "future_format":
            cfg["format_version"] = 99
        elif how == "extra_tensor":
            t = load_file(str(wp))
            t["junk"] = torch.zeros(1)
            save_file(t, str(wp))
        cp.write_text(json.dumps(cfg))


BROKEN = {
    "truncated": "truncated or corrupted",
    "garbage": "truncated or corrupted",
    "bitflip": "checksum",
    "missing_weights": "missing",
    "missing_config": "missing",
    "bad_json": "not valid JSON",
    "index_out_of_range": "out of range",
    "duplicate_index": "duplicates",
    "wrong_method": "not an S2FT adapter",
    "future_format": "format_version",
    "extra_tensor": "not in the config",
}


@pytest.mark.parametrize("how", list(BROKEN))
def test_load_refuses_broken_directories(llama_adapter, tmp_path, how):
    save_adapter(llama_adapter[0], tmp_path / "ad")
    _corrupt(tmp_path / "ad", how)
    with pytest.raises(AdapterError, match=BROKEN[how]):
        load_adapter(tmp_path / "ad")


def test_failed_save_keeps_previous_directory(llama_adapter, tmp_path):
    adapter = llama_adapter[0]
    save_adapter(adapter, tmp_path / "ad")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ad").iterdir()}
    bad = load_adapter(tmp_path / "ad")
    bad.blocks[0].delta[0, 0] = float("nan")
    with pytest.raises(AdapterError, match="NaN"):
        save_adapter(bad, tmp_path / "ad")
    assert {p.name: p.read_bytes() for p in (tmp_path / "ad").iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["ad"]
    with pytest.raises(AdapterError, match="valid directory name"):
        save_adapters({"../x": adapter}, tmp_path / "many")


def test_extract_refuses_uninstalled_model(llama_adapter):
    model, plan = _trained(*CASES["llama_gqa"])
    from s2ft_lightning.layers import uninstall

    uninstall(model, merge=True)
    with pytest.raises(AdapterError, match="not an installed S2 layer"):
        extract_adapter(model, plan)


def test_adapter_cli_inspect_merge_export_fuse(llama_adapter, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from s2ft_lightning.adapters.cli import main

    adapter, want, ids = llama_adapter
    base_dir = tmp_path / "base"
    tiny_model("llama", seed=0, num_key_value_heads=2).save_pretrained(base_dir)
    adapter.base_model = str(base_dir)
    save_adapters({"a": adapter, "b": adapter}, tmp_path / "many")

    assert main(["inspect", str(tmp_path / "many"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [a["name"] for a in info["adapters"]] == ["a", "b"] and info["adapters"][0]["num_params"] == 3072
    assert sum(info["overlaps"].values()) > 0  # a and b are the same adapter: everything overlaps

    assert main(["export", str(tmp_path / "many"), "--name", "a", "--out", str(tmp_path / "one")]) == 0
    assert main(["merge", str(tmp_path / "one"), "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")  # stock transformers, no s2ft code
    torch.testing.assert_close(_logits(merged, ids), want, atol=1e-5, rtol=0)

    fuse_args = ["fuse", str(tmp_path / "many"), "--overlap", "mean", "--out", str(tmp_path / "fused")]
    assert main(fuse_args) == 0
    assert "mean" in capsys.readouterr().out
    fused = load_adapter(tmp_path / "fused")  # mean of two equal adapters is the adapter itself
    assert torch.allclose(fused.block(adapter.blocks[0].module, adapter.blocks[0].feature).delta,
                          adapter.blocks[0].delta)  # fmt: skip

    # refusals: exit status 2, a reason on stderr, nothing written
    other = tmp_path / "other_base"
    tiny_model("llama", seed=9, num_key_value_heads=2).save_pretrained(other)
    assert main(["merge", str(tmp_path / "one"), "--base", str(other), "--out", str(tmp_path / "bad")]) == 2
    assert "base weights" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main(["merge", str(tmp_path / "one"), "--base", str(tmp_path / "nope"), "--out", str(tmp_path / "bad")]) == 2
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    one = str(tmp_path / "one")
    for cmd in (["merge", one], ["export", one], ["export-lora", one], ["fuse", one]):
        stamp = (tmp_path / "merged" / "config.json").stat().st_mtime_ns
        assert main([*cmd, "--out", str(tmp_path / "merged")]) == 2  # an existing folder is never overwritten
        assert "already exists" in capsys.readouterr().err
        assert (tmp_path / "merged" / "config.json").stat().st_mtime_ns == stamp


def test_adapter_cli_out_folder_force_inputs_and_permissions(llama_adapter, tmp_path, capsys):
    """--out: new or empty folders are filled, an occupied one needs --force, an input is never replaced; what is
    written is readable like any other file (safetensors writes 0600 by itself)."""
    import os
    import stat

    from s2ft_lightning.adapters.cli import main

    adapter, _, _ = llama_adapter
    save_adapter(adapter, tmp_path / "ad")
    mask = os.umask(0)
    os.umask(mask)
    for path in [tmp_path / "ad", *(tmp_path / "ad").iterdir()]:
        want = (0o777 if path.is_dir() else 0o666) & ~mask
        assert stat.S_IMODE(path.stat().st_mode) == want, path  # adapter_model.safetensors included
    ad = str(tmp_path / "ad")
    (tmp_path / "empty").mkdir()
    assert main(["export-lora", ad, "--out", str(tmp_path / "empty")]) == 0  # an empty folder is filled
    lora = tmp_path / "empty" / "adapter_model.safetensors"
    assert lora.is_file() and stat.S_IMODE(lora.stat().st_mode) == 0o666 & ~mask
    stamp = lora.stat().st_mtime_ns
    assert main(["export-lora", ad, "--out", str(tmp_path / "empty")]) == 2
    assert "already exists; pass --force to replace it" in capsys.readouterr().err
    assert lora.stat().st_mtime_ns == stamp
    (tmp_path / "empty" / "stale.txt").write_text("from before")
    assert main(["export-lora", ad, "--out", str(tmp_path / "empty"), "--force"]) == 0
    assert lora.is_file() and not (tmp_path / "empty" / "stale.txt").exists()  # replaced as a whole
    for argv in (["export", ad, "--out", ad, "--force"], ["fuse", ad, "--out", str(tmp_path), "--force"]):
        assert main(argv) == 2
        assert "would replace the input" in capsys.readouterr().err
    assert load_adapter(ad).num_params == adapter.num_params
    (tmp_path / "file.txt").write_text("x")
    assert main(["export", ad, "--out", str(tmp_path / "file.txt"), "--force"]) == 2
    assert "is not a folder" in capsys.readouterr().err
    # a file is not an adapter directory, and the message says so (it does exist)
    assert main(["inspect", str(tmp_path / "file.txt")]) == 2
    err = capsys.readouterr().err
    assert "is a file, not an adapter directory" in err and "does not exist" not in err
    with pytest.raises(SystemExit) as e:  # argparse's own mistakes: one line, no usage dump
        main(["merge", ad])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "--out" in err and "usage" not in err


def test_inspect_into_a_closed_pipe_ends_quietly(llama_adapter, tmp_path):
    import subprocess
    import sys

    adapter, _, _ = llama_adapter
    save_adapters({f"a{i}": adapter for i in range(300)}, tmp_path / "many")
    code = "import sys; from s2ft_lightning.adapters.cli import main; sys.exit(main(sys.argv[1:]))"
    full = subprocess.run([sys.executable, "-c", code, "inspect", str(tmp_path / "many"), "--json"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert len(full.stdout) > 3 * 65536  # several pipe buffers: the reader closes while we still write
    cmd = f"{sys.executable} -c '{code}' inspect {tmp_path / 'many'} --json | head -c 20"
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr and proc.stdout.startswith("{")


def test_hand_made_plan_with_two_slices_on_one_module():
    """Two column slices of one module (as GQA can produce) become one block; a hand-permuted FFN."""
    from s2ft_lightning.layers import install
    from surgery.plan import BlockSlice, S2Plan, model_fingerprint

    model = tiny_model("llama", seed=0)
    perm = torch.randperm(48, generator=torch.Generator().manual_seed(4)).tolist()  # new p holds old perm[p]
    mlp = model.model.layers[1].mlp
    with torch.no_grad():  # permute FFN channels by hand: gate/up rows, down columns
        mlp.gate_proj.weight.copy_(mlp.gate_proj.weight[perm])
        mlp.up_proj.weight.copy_(mlp.up_proj.weight[perm])
        mlp.down_proj.weight.copy_(mlp.down_proj.weight[:, perm])
    name = "model.layers.1.mlp.down_proj"
    slices = [
        BlockSlice(name, "down", "in", [(0, 3)], perm[0:3]),
        BlockSlice(name, "down", "in", [(10, 14)], perm[10:14]),
        BlockSlice("model.layers.1.mlp.up_proj", "up", "out", [(5, 9)], perm[5:9]),
    ]
    plan = S2Plan(model_fingerprint(model), "llama", {}, {}, slices)
    install(model, plan)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    ids = torch.randint(0, 128, (2, 7))
    want = _logits(model, ids)
    adapter = extract_adapter(model, plan)
    down = adapter.block(name, "in")
    assert down.indices == perm[0:3] + perm[10:14] and len(down.base_checks) == 2
    base = tiny_model("llama", seed=0)
    merge_adapter(base, adapter)
    torch.testing.assert_close(_logits(base, ids), want, atol=1e-5, rtol=0)

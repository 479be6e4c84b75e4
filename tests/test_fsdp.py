"""DDP and FSDP2 through Lightning (2 CPU processes, gloo) against one process with the same global batch.

FSDP2 runs through Lightning's ModelParallelStrategy: the frozen base is sharded per decoder layer, the deltas
train exactly as in one process, checkpoints hold only what trains and resume bit-exactly, and adapters / merged
models come out without gathering the model on one rank.
"""

from __future__ import annotations

import pytest
import torch
from dist import run_worker
from torch.distributed.checkpoint import FileSystemReader
from transformers import AutoModelForCausalLM

from s2ft_lightning import load_adapter, merge_adapter

pytestmark = pytest.mark.slow


def _worst(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def runs(tiny_llama_dir, tmp_path_factory):
    """One process, DDP and FSDP: 3 AdamW steps each (FSDP also writes its adapter and merged model)."""
    root = tmp_path_factory.mktemp("dist")
    common = ("--optimizer", "adamw", "--adapter")
    return {
        "dir": root,
        "single": run_worker(tiny_llama_dir, root / "single", "single", *common),
        "ddp": run_worker(tiny_llama_dir, root / "ddp", "ddp", *common),
        "fsdp": run_worker(tiny_llama_dir, root / "fsdp", "fsdp", *common, "--merged"),
    }


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_equal_one_process(runs, strategy):
    single, _ = runs["single"]
    assert max(float(v.abs().max()) for v in single.values()) > 0
    assert _worst(single, runs[strategy][0]) <= 1e-5


def test_fsdp_ranks_hold_half_the_frozen_base(runs):
    ddp_bytes = runs["ddp"][1][0]["frozen_bytes_local"]
    fsdp_stats = runs["fsdp"][1]
    assert len(fsdp_stats) == 2
    for s in fsdp_stats:
        assert s["frozen_bytes_local"] <= 0.55 * ddp_bytes


def test_adapter_and_merged_model_from_a_sharded_run(runs, tiny_llama_dir):
    root = runs["dir"]
    adapter = load_adapter(root / "fsdp" / "adapter" / "default")
    ref = load_adapter(root / "single" / "adapter" / "default")
    assert adapter.num_params == ref.num_params == sum(v.numel() for v in runs["fsdp"][0].values())
    for b in ref.blocks:
        got = adapter.block(b.module, b.feature)
        assert got.indices == b.indices and torch.allclose(got.delta, b.delta, atol=1e-5)
    merged = AutoModelForCausalLM.from_pretrained(root / "fsdp" / "merged").eval()
    stock = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    merge_adapter(stock, adapter)
    ids = torch.randint(3, 300, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, stock(input_ids=ids).logits, atol=1e-6, rtol=1e-6)


def test_fsdp_accumulation_and_clipping_match_one_process(tiny_llama_dir, tmp_path):
    lr, clip, steps = 0.5, 0.01, 2
    extra = ("--accumulate", "2", "--clip", str(clip), "--steps", str(steps))
    single, _ = run_worker(tiny_llama_dir, tmp_path / "single", "single", *extra)
    fsdp, _ = run_worker(tiny_llama_dir, tmp_path / "fsdp", "fsdp", *extra)
    assert _worst(single, fsdp) <= 1e-5
    # SGD with a clipped total norm moves no weight more than lr * clip per step: the clip acted
    biggest = max(float(v.abs().max()) for v in single.values())
    assert 0 < biggest <= steps * lr * clip * 1.0001


def test_fsdp_checkpoint_holds_only_what_trains_and_resumes_bit_exactly(tiny_llama_dir, tmp_path):
    common = ("--optimizer", "adamw", "--checkpoint")
    full_run, _ = run_worker(tiny_llama_dir, tmp_path / "full", "fsdp", *common, "--epochs", "2")
    run_worker(tiny_llama_dir, tmp_path / "first", "fsdp", *common, "--epochs", "1")
    ckpt = tmp_path / "first" / "ck" / "last.ckpt"
    keys = set(FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata)
    model_keys = {k for k in keys if k.startswith("state_dict.")}
    assert model_keys and all(k.rsplit(".", 1)[-1].startswith("delta_") for k in model_keys)  # no frozen base
    meta = torch.load(ckpt / "meta.pt", weights_only=True)
    assert meta["s2ft"]["plan"]["slices"] and meta["s2ft"]["base_values"]
    resumed, _ = run_worker(
        tiny_llama_dir, tmp_path / "resumed", "fsdp", *common, "--epochs", "2", "--resume", str(ckpt)
    )
    assert _worst(full_run, resumed) == 0.0


def test_fsdp_trains_moe_experts_like_one_process(tiny_moe_dir, tmp_path):
    """Expert blocks live inside the sharded experts module: same deltas and adapter as one process."""
    single, _ = run_worker(tiny_moe_dir, tmp_path / "single", "single", "--optimizer", "adamw", "--adapter")
    fsdp, stats = run_worker(tiny_moe_dir, tmp_path / "fsdp", "fsdp", "--optimizer", "adamw", "--adapter")
    assert any("experts.down_proj[" in k for k in single) and _worst(single, fsdp) <= 1e-5
    ref, got = (
        load_adapter(tmp_path / "single" / "adapter" / "default"),
        load_adapter(tmp_path / "fsdp" / "adapter" / "default"),
    )
    assert [b.module for b in got.blocks] == [b.module for b in ref.blocks]
    for a, b in zip(ref.blocks, got.blocks):
        assert a.indices == b.indices and a.base_checks == b.base_checks
        torch.testing.assert_close(a.delta, b.delta, atol=1e-5, rtol=0)
    assert all(s["frozen_bytes_local"] > 0 for s in stats)

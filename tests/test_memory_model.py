"""The memory model (benchmarks/memory_model.py): its parts against measurements, and its predictions' shape."""

from __future__ import annotations

import pytest

from benchmarks import memory_check as mc
from benchmarks import memory_model as mm

TINY = mm.Shape("tiny", hidden=128, layers=2, intermediate=344, heads=4, kv_heads=2, vocab=512, o_ratio=0.25)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_activation_formulas_match_saved_tensor_measurements(dtype):
    for row in mc.check_activations(TINY, dtypes=(dtype,)):
        assert abs(row["rel_err"]) <= 0.10, row


def test_weight_and_state_formulas_match_measurements():
    pytest.importorskip("torchao")
    for row in [*mc.check_weights(TINY), *mc.check_training_state(TINY)]:
        assert abs(row["rel_err"]) <= 0.10, row


def test_predictions_order_as_the_methods_do():
    s = mm.SHAPES["llama2-7b"]
    p = {m: mm.predict(s, m)["total"] for m in mm.METHODS}
    assert p["s2ft"] < p["lora"] < p["full"]
    assert mm.predict(s, "s2ft", base="nf4")["total"] < p["s2ft"]
    assert mm.predict(s, "s2ft", checkpointing=True)["total"] < p["s2ft"]
    sharded = mm.predict(s, "s2ft", devices=8)
    assert sharded["weights"] == pytest.approx(mm.predict(s, "s2ft")["weights"] / 8)
    assert sharded["fsdp_gathered"] > 0
    # NF4 stores the decoder's linear weights in about a quarter of bf16's bytes; embeddings stay bf16
    assert mm.base_weight_bytes(s, "nf4") <= 0.3 * mm.base_weight_bytes(s, "bf16")
    with pytest.raises(ValueError, match="no frozen quantized base"):
        mm.predict(s, "full", base="nf4")


def test_fits_table_and_fsdp_traffic():
    rows = mm.fits_table()
    assert {r["model"] for r in rows} == set(mm.SHAPES)
    seventy = {
        (r["method"], r["base"], r["devices"], r["checkpointing"]): r["fits"] for r in rows if "70b" in r["model"]
    }
    assert seventy[("s2ft", "nf4", 1, True)] and not seventy[("full", "bf16", 8, False)]
    t = mm.fsdp_traffic(mm.SHAPES["llama3-70b"], "s2ft", 8, 2048)
    assert t["fsdp_comm_s"] > t["ddp_comm_s"] > 0 and t["hidden_from_tokens_per_device"] > 0

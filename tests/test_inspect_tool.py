"""tools/inspect_structure.py: the audit's JSON contract, its table, and exit codes on bad input."""

import importlib.util
import json
from pathlib import Path

import pytest

from benchmarks.tiny_models import tiny_model

_spec = importlib.util.spec_from_file_location(
    "inspect_structure", Path(__file__).resolve().parents[1] / "tools" / "inspect_structure.py"
)
inspect_structure = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(inspect_structure)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "phi3"])
def test_json_audit_verifies(model_type, capsys):
    code = inspect_structure.main([model_type, "--tiny", "--o-ratio", "0.25", "--d-ratio", "0.1", "--verify", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert out["model_type"] == model_type and out["layers"] == 2
    assert out["verified"] is True and out["rel_diff"] <= 1e-4  # relative to the logit scale, as verify checks
    assert out["couplings"] >= 4 and 0 < out["trainable_params"] < out["total_params"]
    assert out["lora_rank_equivalent"] > 0


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_moe_audit_trains_every_expert(model_type, capsys):
    args = [model_type, "--tiny", "--o-ratio", "0.25", "--d-ratio", "0.1", "--u-ratio", "0.1", "--verify"]
    assert inspect_structure.main(args) == 0
    text = capsys.readouterr().out
    assert "verification: PASSED" in text
    cfg = tiny_model(model_type).config
    k = max(1, round(0.1 * (getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size)))
    assert f"expert down {k} cols (1 run) ×4" in text and f"expert up {k} rows (1 run) ×4" in text  # all 4 experts


def test_table_names_what_is_trained(capsys):
    assert inspect_structure.main(["llama", "--tiny", "--verify"]) == 0
    text = capsys.readouterr().out
    assert "verification: PASSED" in text and "o 8 cols" in text and "LoRA rank" in text


def test_unsupported_model_exits_2(capsys):
    assert inspect_structure.main(["mamba", "--tiny", "--json"]) == 2
    assert "no attention blocks" in json.loads(capsys.readouterr().out)["error"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--o-ratio", "1.5"], "o_ratio=1.5 is outside [0, 1)"),
        (["--o-ratio", "0", "--d-ratio", "0"], "nothing would be trained"),
    ],
)
def test_bad_inputs_exit_2_with_the_reason(args, message, capsys):
    assert inspect_structure.main(["llama", "--tiny", "--json", *args]) == 2
    assert message in json.loads(capsys.readouterr().out)["error"]


def test_unknown_strategy_is_refused_by_the_parser_with_the_choices(capsys):
    with pytest.raises(SystemExit) as e:
        inspect_structure.main(["llama", "--tiny", "--strategy", "psychic"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "psychic" in err and "weight_activation" in err


def test_missing_model_path_exits_2(tmp_path, capsys):
    assert inspect_structure.main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_unknown_tiny_model_type_is_one_short_line_with_close_matches(capsys):
    assert inspect_structure.main(["notamodel", "--tiny"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and len(err) < 400 and "'notamodel' is none of the" in err  # not all ~800 types
    assert inspect_structure.main(["lama", "--tiny"]) == 2
    assert "did you mean llama" in capsys.readouterr().err


def test_model_argument_has_help(capsys):
    with pytest.raises(SystemExit):
        inspect_structure.main(["--help"])
    assert "a transformers model_type" in " ".join(capsys.readouterr().out.split())


def test_tiny_vision_language_model_is_shrunk_and_names_its_frozen_tower(capsys):
    """--tiny shrinks nested text and vision configs (it used to build them full size and be OOM-killed)."""
    assert inspect_structure.main(["llava", "--tiny", "--o-ratio", "0.25", "--verify", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["verified"] is True and out["total_params"] < 100_000
    (tower,) = out["frozen"]
    assert tower["name"] == "model.vision_tower" and "feed token ids" in tower["reason"]

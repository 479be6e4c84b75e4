"""The README's lm-evaluation-harness commands run as printed: a merged run folder and an exported PEFT adapter
scored on the local example task (a tiny model stands in for the demo model and the quickstart's run)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-eval is in the study and test extras: pip install -e '.[test]'")

from tiny_tokenizer import save_tiny_llama  # noqa: E402

from s2ft_lightning.adapters import export_peft_lora, extract_adapter  # noqa: E402
from s2ft_lightning.demo import COMPLETE_MARKER  # noqa: E402
from s2ft_lightning.export import export_merged  # noqa: E402
from s2ft_lightning.models import load_model  # noqa: E402
from s2ft_lightning.pipeline import S2Config, prepare_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MARKER = "### Evaluate a trained run with lm-evaluation-harness"


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text[text.index(MARKER) :], flags=re.S).group(1)
    return [line.strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]


def _trained_run(tmp_path: Path) -> None:
    """The demo base in a private S2FT cache and, as after the quickstart, runs/quickstart/{merged,lora}."""
    base = save_tiny_llama(tmp_path / "cache" / "smollm2-135m", max_position_embeddings=128)
    (base / COMPLETE_MARKER).write_text(json.dumps({"source": "test"}))
    model, tok = load_model(base)
    plan = prepare_model(model, S2Config(o_ratio=0.5, d_ratio=0.25, seed=0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn(p.shape, generator=g))  # "trained" blocks: the function moves
    run = tmp_path / "runs" / "quickstart"
    export_peft_lora(extract_adapter(model, plan, base_model=str(base), name="default"), run / "lora")
    export_merged(model, plan, run / "merged", tokenizer=tok)


def test_readme_lm_eval_commands_score_the_merged_folder_and_the_peft_adapter(tmp_path):
    commands = _readme_commands()
    assert len(commands) == 2 and all(c.startswith("lm_eval --model hf") for c in commands)
    assert "pretrained=runs/quickstart/merged" in commands[0] and "peft=runs/quickstart/lora" in commands[1]
    _trained_run(tmp_path)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "S2FT_CACHE": str(tmp_path / "cache"),
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(tmp_path / "hf_datasets"),
    }
    scores = []
    for cmd in commands:
        proc = subprocess.run(cmd, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        acc = re.search(r"\|s2ft_arith_mc\|.*?\|acc\s*\|.*?\|([0-9.]+)\|", proc.stdout)
        norm = re.search(r"\|acc_norm\|.*?\|([0-9.]+)\|", proc.stdout)
        assert acc and norm, proc.stdout[-2000:]
        scores.append((float(acc.group(1)), float(norm.group(1))))
    # the merged weights and base + exported LoRA are the same trained function: the same answers on 40 items
    assert scores[0] == scores[1]

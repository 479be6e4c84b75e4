"""The README's code runs as printed (with the real offline demo model)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_block_after(marker: str) -> str:
    text = README.read_text()
    start = text.index(marker)
    match = re.search(r"```python\n(.*?)```", text[start:], flags=re.S)
    assert match, f"no python block after {marker!r} in README.md"
    return match.group(1)


@pytest.mark.slow
def test_callback_example_runs_as_printed(tmp_path, monkeypatch):
    code = _python_block_after("In your own Lightning project")
    monkeypatch.chdir(tmp_path)
    scope: dict = {"__name__": "readme_example"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the README's own example
    assert not [w for w in caught if "eval mode" in str(w.message)]  # the model trains in train mode
    trainer, restored = scope["trainer"], scope["restored"]
    assert trainer.global_step == 4
    assert (tmp_path / "runs" / "example" / "adapters" / "default" / "adapter_config.json").is_file()
    trained = trainer.lightning_module
    deltas = {n: p for n, p in trained.named_parameters() if p.requires_grad}
    assert deltas and all(float(p.abs().max()) > 0 for p in deltas.values())  # the blocks trained
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        want = trained.model.eval()(input_ids=ids).logits
        got = restored.model.eval()(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _commands_after(marker: str) -> list[str]:
    text = README.read_text()
    start = text.index(marker)
    block = re.search(r"```bash\n(.*?)```", text[start:], flags=re.S).group(1)
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]


@pytest.mark.slow
def test_use_commands_run_twice_on_the_quickstarts_run(tmp_path):
    """The README's "Use" block right after the quickstart (shortened to 3 steps), in a fresh folder, run twice
    as printed: every command succeeds both times and works on the quickstart's run, which stays `latest`."""
    repo = README.parent
    for name in ("configs", "tools", "benchmarks"):
        (tmp_path / name).symlink_to(repo / name)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}

    def run(cmd: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        return proc

    assert _commands_after("## Quickstart") == ["s2ft fit --config configs/quickstart.yaml"]
    # the quickstart, shortened: 3 steps on fewer generated questions
    run("s2ft fit --config configs/quickstart.yaml --trainer.max_steps 3 --data.train_size 64 --data.test_size 8")
    logs = tmp_path / "runs" / "quickstart" / "logs"
    quickstart = (logs / "latest").resolve()
    assert quickstart == (logs / "version_0").resolve()
    commands = _commands_after("## Use")
    assert len(commands) == 6 and commands[0].startswith("s2ft fit") and "--print_config" in commands[0]
    for _ in range(2):
        for cmd in commands:
            proc = run(cmd)
            if "--print_config" in cmd:
                printed = yaml.safe_load(proc.stdout)
                assert printed["trainer"]["max_steps"] == 400 and printed["model"]["s2"]["d_ratio"] == 0.03
            if "inspect_structure" in cmd:
                assert "verification: PASSED" in proc.stdout
            if "adapter inspect" in cmd:
                assert "adapter 'default'" in proc.stdout
            if "validate" in cmd:
                assert "val/loss" in proc.stdout and "validate_metrics.json" in proc.stdout
            if "export-lora" in cmd:
                assert "(30 modules, rank 95)" in proc.stdout  # Down columns of 95 channels in each of 30 layers
            noise = [
                n for n in ("Failed to load", "_pytree", "litlogger", "LeafSpec") if n in proc.stdout + proc.stderr
            ]
            assert not noise, (cmd, noise)
        # the block worked on the quickstart's run, made no run folder of its own and left it the latest
        assert sorted(p.name for p in logs.iterdir()) == ["latest", "version_0"]
        assert (logs / "latest").resolve() == quickstart
        validated = json.loads((quickstart / "validate_metrics.json").read_text())
        assert validated["checkpoint"].startswith("runs/quickstart/logs/latest") and "val/loss" in validated["metrics"]
        _check_merged(tmp_path / "runs" / "quickstart" / "merged", quickstart)
    merged = tmp_path / "runs" / "quickstart" / "merged"  # the adapter's recorded base was demo:smollm2
    assert (merged / "config.json").is_file() and (merged / "tokenizer.json").is_file()
    for path in (merged, *merged.iterdir()):  # safetensors writes 0600; the folder's files are readable
        assert path.stat().st_mode & 0o777 == (0o777 if path.is_dir() else 0o666) & ~_umask(), path
    _check_exported_lora(tmp_path / "runs" / "quickstart")


def _check_merged(merged: Path, quickstart: Path) -> None:
    """The merged folder is the base plus the quickstart run's adapter (and differs from the base)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from s2ft_lightning.adapters import load_adapter, merge_adapter
    from s2ft_lightning.models import resolve_path

    name = "model.layers.0.mlp.down_proj.weight"
    got = load_file(merged / "model.safetensors")[name]
    base = AutoModelForCausalLM.from_pretrained(resolve_path("demo:smollm2"), dtype="auto")
    assert not torch.equal(base.state_dict()[name], got)
    merge_adapter(base, load_adapter(quickstart / "adapter" / "default"))
    assert torch.equal(base.state_dict()[name], got)


def _check_exported_lora(run: Path) -> None:
    """Stock PEFT serving the exported LoRA gives the logits of the S2FT adapter merged into the base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from s2ft_lightning.adapters import load_adapter, merge_adapter
    from s2ft_lightning.models import resolve_path

    def base():
        return AutoModelForCausalLM.from_pretrained(resolve_path("demo:smollm2"), dtype=torch.float32).eval()

    ours = base()
    merge_adapter(ours, load_adapter(run / "logs" / "latest" / "adapter" / "default"))
    served = PeftModel.from_pretrained(base(), run / "lora").eval()
    ids = torch.arange(1, 33)[None]
    with torch.no_grad():
        got, want = served(input_ids=ids).logits, ours(input_ids=ids).logits
    # fp32 rounding only: PEFT adds x·Aᵀ·Bᵀ beside the base matmul, the merge adds Δ into W first (30 layers deep)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max() * 30


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask

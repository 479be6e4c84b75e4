"""The README's code runs as printed (with the real offline demo model)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

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
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the README's own example
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
def test_use_commands_run_as_printed(tmp_path):
    """The README's "Use" block, in a fresh folder, in order (the first command makes the run the others use)."""
    import os
    import subprocess
    import sys

    repo = README.parent
    for name in ("configs", "tools", "benchmarks"):
        (tmp_path / name).symlink_to(repo / name)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    commands = _commands_after("## Use")
    assert len(commands) == 7 and commands[0].startswith("s2ft fit")
    for cmd in commands:
        proc = subprocess.run(cmd, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        if "inspect_structure" in cmd:
            assert "verification: PASSED" in proc.stdout
        if "adapter inspect" in cmd:
            assert "adapter 'default'" in proc.stdout
        if "validate" in cmd:
            assert "val/loss" in proc.stdout
        if "export-lora" in cmd:
            assert "(30 modules, rank 95)" in proc.stdout  # Down columns of 95 channels in each of 30 layers
    assert (tmp_path / "runs" / "quickstart" / "logs" / "latest" / "adapter" / "default").is_dir()
    merged = tmp_path / "runs" / "quickstart" / "merged"  # the adapter's recorded base was demo:smollm2
    assert (merged / "config.json").is_file() and (merged / "tokenizer.json").is_file()
    assert merged.stat().st_mode & 0o777 == 0o777 & ~_umask()
    _check_exported_lora(tmp_path / "runs" / "quickstart")


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

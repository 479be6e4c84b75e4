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

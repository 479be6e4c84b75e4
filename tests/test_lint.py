"""The tree stays ruff-clean (lint and format), as configured in pyproject.toml."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _ruff(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    return subprocess.run([exe, *args], cwd=ROOT, capture_output=True, text=True)


def test_ruff_check_clean():
    r = _ruff("check", ".")
    assert r.returncode == 0, r.stdout + r.stderr


def test_ruff_format_clean():
    r = _ruff("format", "--check", ".")
    assert r.returncode == 0, r.stdout + r.stderr


def test_no_script_folder_shadows_a_standard_module():
    """Scripts run as ``python benchmarks/x.py`` put their folder first on sys.path: a ``profile.py`` there
    replaced the standard ``profile`` that ``cProfile`` (imported by torch._dynamo) needs."""
    shadows = [
        p.relative_to(ROOT).as_posix()
        for folder in ("benchmarks", "tools", "tests")
        for p in (ROOT / folder).glob("*.py")
        if p.stem in sys.stdlib_module_names
    ]
    assert not shadows, f"rename these: they shadow standard modules when scripts run: {shadows}"

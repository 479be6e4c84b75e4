"""A run's life on the `s2ft` command line: Ctrl-C keeps the training, resuming continues it exactly, a resume
that would train nothing is refused, and evaluation runs leave the runs folder alone.

The interrupt is a real SIGINT the training process sends itself (tests/sigint_at_step.py), in a subprocess; the
resume is a fresh process.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from s2ft_lightning.adapters import load_adapter
from s2ft_lightning.cli import cli_main, main
from s2ft_lightning.data.base import EpochSeededSampler, ResumableDataLoader

TESTS = Path(__file__).resolve().parent
NOISE = ("Failed to load", "_pytree", "litlogger", "LeafSpec", "Traceback")


def _config(root: Path, model_dir: Path) -> Path:
    """A quickstart-like recipe on the tiny Llama: 6 steps of 16 per epoch, held-out val and test splits."""
    cfg = yaml.safe_load((TESTS.parent / "configs" / "quickstart.yaml").read_text())
    cfg["trainer"].update(max_steps=6, log_every_n_steps=1, default_root_dir="runs", enable_model_summary=False)
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = "runs"
    cfg["trainer"]["callbacks"] = [c for c in cfg["trainer"]["callbacks"] if "HeldOutAccuracy" not in c["class_path"]]
    cfg["model"].update(model=str(model_dir))
    cfg["model"]["s2"].update(o_ratio=0.25, d_ratio=0.1)
    cfg["data"]["init_args"].update(train_size=64, val_size=4, test_size=4, batch_size=4, max_length=48)
    cfg["data"]["init_args"]["task_kwargs"].update(min_digits=1, max_digits=1)
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _s2ft(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """The `s2ft` console script in a fresh process; tests/ on the path for the SIGINT callback."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    script = Path(sys.executable).parent / "s2ft"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "s2ft_lightning.cli"]
    return subprocess.run([*cmd, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def run(tiny_llama_dir, tmp_path_factory):
    """Fit interrupted by SIGINT when step 3 starts (so step 3 finishes and is saved), then resumed to step 6."""
    root = tmp_path_factory.mktemp("interrupt")
    cfg = _config(root, tiny_llama_dir)
    sigint = ["--trainer.callbacks+=sigint_at_step.SigintAtStep", "--trainer.callbacks.step", "2"]
    interrupted = _s2ft(["fit", "--config", str(cfg), *sigint], root)
    interrupted.latest = (root / "runs" / "logs" / "latest").resolve()  # before the resume moves it
    resumed = _s2ft(["fit", "--config", str(cfg), "--ckpt_path", "runs/logs/version_0/checkpoints/last.ckpt"], root)
    return root, cfg, interrupted, resumed


def test_ctrl_c_saves_the_last_completed_step_marked_interrupted_and_says_where(run):
    root, _, interrupted, _ = run
    out = interrupted.stdout + interrupted.stderr
    assert interrupted.returncode == 1, out  # Lightning's exit status for an interrupted fit
    version = root / "runs" / "logs" / "version_0"
    ckpt, adapter_dir = version / "checkpoints" / "last.ckpt", version / "adapter" / "default"
    assert "interrupted at step 3 of 6" in interrupted.stdout
    assert f"checkpoint: {ckpt.relative_to(root)}" in interrupted.stdout
    assert f"adapter default: {adapter_dir.relative_to(root)}" in interrupted.stdout
    assert f"--ckpt_path {ckpt.relative_to(root)}" in interrupted.stdout
    state = torch.load(ckpt, weights_only=True)
    assert state["global_step"] == 3 and state["s2ft_interrupted"] == {"step": 3, "max_steps": 6}
    adapter = load_adapter(adapter_dir)
    assert adapter.metadata["s2ft_interrupted"] == {"step": 3, "max_steps": 6}
    assert all(float(b.delta.abs().max()) > 0 for b in adapter.blocks)  # three steps trained
    assert interrupted.latest == version.resolve()
    assert re.findall(r"Epoch 0/0 .*? (\d+)/(\d+) ", out)[-1] == ("3", "6")  # the run's total, not the epoch's 16
    assert not [n for n in NOISE if n in out]


def test_resuming_continues_to_max_steps_exactly_as_an_uninterrupted_run(run, monkeypatch, capsys):
    root, cfg, _, resumed = run
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    steps = [line.split()[1] for line in resumed.stdout.splitlines() if line.startswith("step ")]
    assert steps == ["4/6", "5/6", "6/6"]  # continues after step 3, retrains nothing
    assert torch.load(root / "runs/logs/version_1/checkpoints/last.ckpt", weights_only=True)["global_step"] == 6
    out = resumed.stdout + resumed.stderr
    assert re.findall(r"Epoch 0/0 .*? (\d+)/(\d+) ", out)[-1] == ("6", "6") and not [n for n in NOISE if n in out]
    # the same recipe, never interrupted, in this process: the same trained deltas (same data order, same state)
    monkeypatch.chdir(root)
    cli_main(["fit", "--config", str(cfg), "--trainer.logger.init_args.name", "reference"])
    printed = "".join(capsys.readouterr())
    bar = re.findall(r"Epoch 0/0 .*? (\d+)/(\d+) ", printed)
    assert bar and bar[-1] == ("6", "6"), printed[-800:]  # a fresh run's bar: 6 steps, not the epoch's 16 batches
    want = load_adapter(root / "runs" / "reference" / "version_0" / "adapter" / "default")
    got = load_adapter(root / "runs" / "logs" / "version_1" / "adapter" / "default")
    assert "s2ft_interrupted" not in got.metadata
    # Bit-identical when both processes sum alike; on another thread count a BLAS splits reductions differently
    # (seen on an AMD EPYC, 1 thread against 2: 5e-9 of a 6e-3 delta), and Adam's division by sqrt(v) turns that
    # rounding in a near-zero gradient into up to ~1e-6 of the delta. A resume bug (a step retrained, optimizer state
    # lost) moves elements by a whole step's update, lr = 1/6 of the largest delta here.
    for a, b in zip(got.blocks, want.blocks, strict=True):
        assert a.key == b.key
        torch.testing.assert_close(a.delta, b.delta, atol=1e-5 * float(b.delta.abs().max()), rtol=0)


def test_a_resume_that_would_train_nothing_says_so_and_exits_2(run, monkeypatch, capsys):
    root, cfg, _, _ = run
    monkeypatch.chdir(root)
    before = sorted(p.name for p in (root / "runs" / "logs").iterdir())
    finished = "runs/logs/version_1/checkpoints/last.ckpt"  # step 6 of 6; its epoch counts as finished
    cases = [
        ([], "already reached --trainer.max_steps 6"),
        (["--trainer.max_steps", "8"], "finished epoch 1 and --trainer.max_epochs is 1"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as e:
            main(["fit", "--config", str(cfg), "--ckpt_path", finished, *extra])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and "resuming would train nothing" in err, err
        assert [line for line in err.splitlines() if "error" in line] == [err.strip().splitlines()[-1]]
    assert sorted(p.name for p in (root / "runs" / "logs").iterdir()) == before  # no run folder made
    # raising max_epochs as the message says trains on
    cli_main(["fit", "--config", str(cfg), "--ckpt_path", finished, "--trainer.max_steps", "7",
              "--trainer.max_epochs", "2", "--trainer.logger.init_args.name", "more"])  # fmt: skip
    capsys.readouterr()
    assert torch.load(root / "runs/more/version_0/checkpoints/last.ckpt", weights_only=True)["global_step"] == 7


def test_validate_and_test_make_no_run_folder_and_save_metrics_with_the_checkpoint(run, monkeypatch, capsys):
    root, cfg, _, _ = run
    monkeypatch.chdir(root)
    logs = root / "runs" / "logs"
    before, latest = sorted(p.name for p in logs.iterdir()), (logs / "latest").resolve()
    for stage, metric in (("validate", "val/loss"), ("test", "test/loss")):
        main([stage, "--config", str(cfg), "--ckpt_path", "runs/logs/latest/checkpoints/last.ckpt"])
        written = latest / f"{stage}_metrics.json"
        assert f"written to {written.relative_to(root)}" in capsys.readouterr().out
        saved = json.loads(written.read_text())
        assert saved["checkpoint"] == "runs/logs/latest/checkpoints/last.ckpt" and metric in saved["metrics"]
    assert sorted(p.name for p in logs.iterdir()) == before and (logs / "latest").resolve() == latest
    assert not (root / "runs" / "config.yaml").exists()  # nor a saved config


def test_the_train_loader_resumes_mid_epoch_at_the_next_batch():
    data = list(range(22))

    def loader():
        return ResumableDataLoader(data, batch_size=4, sampler=EpochSeededSampler(data, seed=3))

    first = loader()
    full = [b.tolist() for b in first]
    assert sorted(sum(full, [])) == data and first.state_dict() == {"epoch": 0, "batches": 6}
    it = iter(first)
    taken = [next(it).tolist() for _ in range(2)]
    state = first.state_dict()
    assert taken == full[:2] and state == {"epoch": 0, "batches": 2}
    fresh = loader()
    fresh.load_state_dict(state)
    assert [b.tolist() for b in fresh] == full[2:]  # the rest of the epoch, in order
    assert [b.tolist() for b in fresh] == full  # the next pass is whole again
    fresh.load_state_dict(state)
    fresh.sampler.set_epoch(1)  # a saved position of another epoch is not applied
    assert len([b.tolist() for b in fresh]) == 6

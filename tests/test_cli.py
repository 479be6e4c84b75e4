"""The `s2ft` LightningCLI: every recipe parses and instantiates, overrides work, bad YAML is explained."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from s2ft_lightning.cli import cli_main, main
from s2ft_lightning.data import InstructionDataModule, ReasoningGymDataModule

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.fixture(scope="module")
def alpaca_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [{"instruction": f"Add {i} and {i + 1}.", "input": "", "output": str(2 * i + 1)} for i in range(20)]
    p.write_text("\n".join(json.dumps(r) for r in rows))
    return p


def _tiny_args(config: Path, model_dir: Path, alpaca: Path) -> list[str]:
    args = ["fit", "--config", str(config), "--model.model", str(model_dir), "--trainer.accelerator", "cpu"]
    args += ["--trainer.logger", "false", "--trainer.default_root_dir", str(model_dir.parent / "runs")]
    if yaml.safe_load(config.read_text())["data"]["class_path"].endswith("InstructionDataModule"):
        args += ["--data.init_args.train_file", str(alpaca), "--data.init_args.max_length", "64"]
    return args


def test_there_are_recipes():
    names = {c.stem for c in CONFIGS}
    assert {"quickstart", "llama2-7b-commonsense", "llama3-8b-math"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_recipe_parses_and_instantiates(config, tiny_llama_dir, alpaca_file):
    raw = yaml.safe_load(config.read_text())
    cli = cli_main(_tiny_args(config, tiny_llama_dir, alpaca_file)[1:], run=False)  # run=False: no subcommand
    s2 = raw["model"]["s2"]
    assert cli.model.s2.o_ratio == s2["o_ratio"] and cli.model.s2.d_ratio == s2["d_ratio"]
    assert cli.model.model_name == str(tiny_llama_dir)
    assert isinstance(cli.datamodule, (InstructionDataModule, ReasoningGymDataModule))
    opt = cli.model.optimizer_factory([torch.nn.Parameter(torch.zeros(2))])
    assert opt.defaults["lr"] == raw["model"]["optimizer"]["init_args"]["lr"]
    if "scheduler" in raw["model"]:
        sched = cli.model.scheduler_factory(opt)
        assert sched.warmup_steps == raw["model"]["scheduler"]["init_args"]["warmup_steps"]
    if "fsdp" in config.stem:  # FSDP2: Lightning's ModelParallelStrategy over 8 data-parallel ranks
        from lightning.pytorch.strategies import ModelParallelStrategy

        assert isinstance(cli.trainer.strategy, ModelParallelStrategy)
        assert cli.trainer.strategy._data_parallel_size == 8 and cli.trainer.strategy._tensor_parallel_size == 1


def test_fit_through_the_cli(tiny_llama_dir, alpaca_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths of the recipe land in the test's folder
    quick = next(c for c in CONFIGS if c.stem == "quickstart")
    args = _tiny_args(quick, tiny_llama_dir, alpaca_file)
    args += ["--trainer.max_steps", "2", "--data.init_args.train_size", "32", "--data.init_args.test_size", "4"]
    args += ["--data.init_args.val_size", "4"]
    args += ["--data.init_args.task_kwargs.min_digits", "1"]
    out = tmp_path / "q"
    args += [
        "--trainer.callbacks+=s2ft_lightning.AdapterCheckpoint",
        f"--trainer.callbacks.dirpath={out / 'adapter'}",
    ]
    cli = cli_main(args)
    assert cli.trainer.global_step == 2
    adapter_dir = out / "adapter" / "default"
    assert (adapter_dir / "adapter_config.json").is_file()
    # The base config has pad_token_id: null (as Llama-2/3 and Mistral ship): the adapter still belongs to it.
    assert json.loads((tiny_llama_dir / "config.json").read_text()).get("pad_token_id") is None
    from transformers import AutoModelForCausalLM

    from s2ft_lightning import load_adapter, merge_adapter
    from s2ft_lightning.adapters.cli import main as adapter_main

    assert (
        adapter_main(["merge", str(adapter_dir), "--out", str(tmp_path / "merged"), "--base", str(tiny_llama_dir)]) == 0
    )
    stock = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    merge_adapter(stock, load_adapter(adapter_dir))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    ids = torch.randint(3, 100, (2, 8))
    with torch.no_grad():
        want = cli.model.model.eval()(input_ids=ids).logits
        torch.testing.assert_close(stock.eval()(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(merged.eval()(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)


def test_print_config_shows_the_resolved_recipe(capsys):
    quick = next(c for c in CONFIGS if c.stem == "quickstart")
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(quick), "--model.s2.d_ratio", "0.05", "--print_config"])
    assert e.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["s2"]["d_ratio"] == 0.05  # the override
    assert printed["model"]["s2"]["o_ratio"] == yaml.safe_load(quick.read_text())["model"]["s2"]["o_ratio"]


def test_console_script_reads_sys_argv_without_lightning_warning(monkeypatch, capsys):
    quick = next(c for c in CONFIGS if c.stem == "quickstart")
    monkeypatch.setattr(sys, "argv", ["s2ft", "fit", "--config", str(quick), "--print_config"])
    with warnings.catch_warnings(record=True) as caught, pytest.raises(SystemExit) as e:
        warnings.simplefilter("always")
        main()  # how the `s2ft` entry point calls it
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (
        e.value.code == 0
        and printed["model"]["s2"]["d_ratio"] == yaml.safe_load(quick.read_text())["model"]["s2"]["d_ratio"]
    )
    assert not [w for w in caught if "args parameter" in str(w.message)]


def _bad(tmp_path, mutate) -> Path:
    quick = next(c for c in CONFIGS if c.stem == "quickstart")
    raw = yaml.safe_load(quick.read_text())
    mutate(raw)
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def test_unknown_key_is_reported(tmp_path, capsys):
    bad = _bad(tmp_path, lambda r: r["model"]["s2"].update(o_ration=0.1))
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(bad), "--print_config"])
    assert e.value.code != 0
    assert "o_ration" in capsys.readouterr().err


def test_wrong_type_is_reported(tmp_path, capsys):
    bad = _bad(tmp_path, lambda r: r["model"]["s2"].update(d_ratio="lots"))
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(bad), "--print_config"])
    assert e.value.code != 0
    err = capsys.readouterr().err
    assert "d_ratio" in err and "lots" in err


def _run_main(argv, capsys, monkeypatch=None):
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code, capsys.readouterr()


def test_mistakes_are_one_paragraph_and_exit_2_before_any_model_loads(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    quick = str(next(c for c in CONFIGS if c.stem == "quickstart"))
    monkeypatch.chdir(tmp_path)
    cases = [
        (["fit", "--config", quick, "--model.s2.o_ratio", "2.0"], "o_ratio=2.0 is outside [0, 1)"),
        (["fit", "--config", quick, "--model.o_ratio", "0.1"], "use --model.s2.o_ratio"),
        (["fit", "--config", quick, "--model.model", str(tmp_path / "nope")], "does not exist"),
        (
            ["validate", "--config", quick, "--model.model", str(tiny_llama_dir), "--ckpt_path", "gone.ckpt"],
            "checkpoint 'gone.ckpt' does not exist",
        ),
    ]
    for argv, message in cases:
        code, out = _run_main(argv, capsys)
        assert code == 2, argv
        assert message in out.err and "Traceback" not in out.err, out.err
        assert out.err.strip().count("\n") == 0  # one paragraph
    occupied = tmp_path / "cache" / "smollm2-135m"
    occupied.mkdir(parents=True)
    (occupied / "other.bin").write_text("x")
    monkeypatch.setenv("S2FT_CACHE", str(tmp_path / "cache"))
    code, out = _run_main(["fit", "--config", quick], capsys)
    assert code == 2 and "holds no complete demo model" in out.err and "S2FT_CACHE" in out.err
    assert [p.name for p in occupied.iterdir()] == ["other.bin"]  # nothing touched
    assert not (tmp_path / "runs").exists()  # refused before any run directory was made


def test_top_level_help_lists_the_adapter_tools(capsys):
    code, out = _run_main(["--help"], capsys)
    assert code == 0 and "s2ft adapter merge" in out.out and "s2ft adapter inspect" in out.out


def test_fit_help_describes_every_s2_option(capsys):
    code, out = _run_main(["fit", "--help"], capsys)
    assert code == 0
    text = " ".join(out.out.split())
    for option in ("o_ratio", "v_ratio", "u_ratio", "d_ratio", "strategy", "variant", "allocation", "seed"):
        assert f"--model.s2.{option}" in text
    assert "Fraction of attention heads per layer" in text and "The base model: a local Hugging Face folder" in text


def test_parser_mistakes_name_the_option_and_the_fix_in_one_line(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    quick = str(next(c for c in CONFIGS if c.stem == "quickstart"))
    monkeypatch.chdir(tmp_path)
    s2_typo = _bad(tmp_path, lambda r: r["model"]["s2"].update(o_ration=0.1)).rename(tmp_path / "s2_typo.yaml")
    data_typo = _bad(tmp_path, lambda r: r["data"]["init_args"].update(batch_sise=3))
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  s2: [\n")
    fit = ["fit", "--config", quick, "--model.model", str(tiny_llama_dir)]
    cases = [
        (
            [*fit, "--model.model_name_or_path", "x"],
            "unknown option --model.model_name_or_path (did you mean --model.model",
        ),
        ([*fit, "--trainer.max_steps", "abc"], "--trainer.max_steps 'abc' is not an integer"),
        (["fit", "--config", "nope.yaml"], "--config nope.yaml: no such file"),
        (["fit", "--config", str(broken)], f"--config {broken} is not valid YAML"),
        (
            ["fit", "--config", str(s2_typo)],
            f"unknown key model.s2.o_ration in {s2_typo} (did you mean model.s2.o_ratio",
        ),
        (["fit", "--config", str(data_typo)], "unknown key data.batch_sise in"),
        ([*fit, "--model.s2.d_ratio", "nan"], "--model.s2.d_ratio 'nan' is not a finite number (Fraction of FFN"),
        ([*fit, "--model.s2.master_dtype", "fp16"], "--model.s2.master_dtype 'fp16' is not one of fp32, base"),
        ([*fit, "--data.batch_sise", "3"], "unknown option --data.batch_sise (did you mean --data.batch_size"),
        ([*fit, "--max_steps", "3"], "unknown option --max_steps (did you mean --trainer.max_steps?)"),
        ([*fit, "--data", "ReasoningGym"], "is not a datamodule class (did you mean ReasoningGymDataModule?)"),
        (["fitt"], "unknown command 'fitt' (did you mean fit?)"),
        ([], "no command given: s2ft fit | validate"),
        # beyond the tiny model's 128-token context: refused when the datamodule is built, before the model loads
        ([*fit, "--data.max_length", "1000", "--trainer.logger", "false"], "context length of 128 tokens"),
    ]
    for argv, message in cases:
        code, out = _run_main(argv, capsys)
        errors = [line for line in out.err.splitlines() if "error:" in line]
        assert code == 2 and message in out.err, (argv, out.err)
        assert len(errors) == 1 and out.err.strip().endswith(errors[0]), out.err  # one line, the last
        assert "usage:" not in out.err and "Traceback" not in out.err
    assert "--data.max_length 128" in out.err  # the fix, with the number
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_console_script_prints_one_line_for_a_typo(tmp_path):
    """Through the installed `s2ft` entry point, as a user types it."""
    import os
    import subprocess

    quick = next(c for c in CONFIGS if c.stem == "quickstart")
    script = Path(sys.executable).parent / "s2ft"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "s2ft_lightning.cli"]
    proc = subprocess.run([*cmd, "fit", "--config", str(quick), "--model.model_name_or_path", "x"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env=dict(os.environ))  # fmt: skip
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "s2ft fit: error: unknown option --model.model_name_or_path (did you mean --model.model or "
        "--model.plan_path?); `s2ft fit --help` lists every option"
    ]


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_print_config_reads_every_recipe_without_its_model(config, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("S2FT_CACHE", str(tmp_path / "empty-cache"))  # not even the demo model is there
    monkeypatch.chdir(tmp_path)
    code, out = _run_main(["fit", "--config", str(config), "--print_config"], capsys)
    assert code == 0, out.err
    printed = yaml.safe_load(out.out)
    assert printed["model"]["model"] == yaml.safe_load(config.read_text())["model"]["model"]
    assert not (tmp_path / "empty-cache").exists()


def test_fit_help_lists_s2ft_and_data_options_before_lightnings(capsys):
    code, out = _run_main(["fit", "--help"], capsys)
    lines = out.out.splitlines()

    def at(option: str) -> int:
        return next(i for i, line in enumerate(lines) if line.strip().startswith(option + " "))

    assert code == 0 and lines[0].startswith("usage: s2ft fit") and len(lines[0]) < 100
    assert at("--model.model") < at("--model.s2.d_ratio") < at("--data.task") < at("--trainer.accelerator")
    # every shipped datamodule's options, not only --data.help CLASS
    for option in ("--data.max_length", "--data.batch_size", "--data.train_file", "--data.train_files", "--data.task"):
        assert at(option) < at("--trainer.max_steps"), option


def test_evaluation_runs_leave_out_only_loggers_that_make_run_folders(tmp_path):
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.loggers.logger import DummyLogger

    from s2ft_lightning.cli import _without_local_loggers

    remote = DummyLogger()  # stands for W&B, MLflow, ...: no run folder of ours
    assert _without_local_loggers([CSVLogger(tmp_path), remote, CSVLogger(tmp_path / "b")]) == [remote]
    assert _without_local_loggers(True) is False and _without_local_loggers(CSVLogger(tmp_path)) is False
    assert not list(tmp_path.iterdir())

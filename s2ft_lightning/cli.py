"""The `s2ft` command: LightningCLI for fit/validate/test/predict, plus `s2ft adapter …` tools.

Mistakes end in one paragraph on stderr and exit status 2 (`S2FT_TRACEBACK=1` shows the traceback), found
before a model is loaded wherever possible; the parser's own are rewritten by `cli_parser`. Every fit prints
step lines when stdout is not a terminal and, at the end, where its files went (`StepLog`, `RunSummary`);
Ctrl-C saves what was trained (`SaveOnInterrupt`). validate / test / predict only evaluate: they make no run
folder of their own (CSV / TensorBoard loggers and the saved config are left out; remote loggers still log) and
never become ``latest``; their metrics go next to the checkpoint they evaluated.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from dataclasses import fields
from pathlib import Path

# Before anything below imports transformers' modeling code, which imports torchao when it is installed and
# prints "Failed to load ... _C_mxfp8" lines for CUDA kernels S²FT never uses (see `quiet_third_party`).
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

from lightning.pytorch.cli import LightningCLI  # noqa: E402

from s2ft_lightning.cli_parser import ARGV, SUBCOMMANDS, S2FTArgumentParser  # noqa: E402
from s2ft_lightning.module import S2FTModule  # noqa: E402

ADAPTER_HELP = """
adapter tools:
  s2ft adapter inspect DIR [--json]          what an adapter (or a folder of adapters) touches, its base, size
  s2ft adapter merge DIR --out MODEL_DIR     merge adapters into their base and save a stock model folder
  s2ft adapter export DIR --out DIR          a standalone, re-validated copy of one adapter
  s2ft adapter export-lora DIR --out DIR     the adapter as an exact PEFT LoRA adapter (for LoRA servers)
  s2ft adapter fuse DIR [DIR ...] --out DIR  combine adapters into one
  (s2ft adapter --help for all options)
"""


class S2FTCLI(LightningCLI):
    """LightningCLI whose optimizer/scheduler are injected into S2FTModule as callables."""

    def add_arguments_to_parser(self, parser) -> None:
        # The datamodule reads its tokenizer from the model path unless told otherwise.
        parser.link_arguments("model.model", "data.init_args.tokenizer", apply_on="parse")

    def parse_arguments(self, parser, args) -> None:
        token = ARGV.set(sys.argv[1:] if args is None else list(args) if isinstance(args, (list, tuple)) else None)
        try:
            super().parse_arguments(parser, args)
        finally:
            ARGV.reset(token)

    @property
    def evaluating(self) -> bool:
        return self.subcommand in ("validate", "test", "predict")

    def instantiate_trainer(self, **kwargs):
        from s2ft_lightning.interrupt import SaveOnInterrupt
        from s2ft_lightning.reporting import RunSummary, StepLog, use_run_length_bar

        if self.evaluating:  # no run folder (local logger, saved config) for a run that only evaluates
            kwargs["logger"] = _without_local_loggers(self._get(self.config_init, "trainer", default={}).get("logger"))
            self.save_config_callback = None
        trainer = super().instantiate_trainer(**kwargs)
        have = {type(cb) for cb in trainer.callbacks}
        trainer.callbacks.extend(cb() for cb in (StepLog, RunSummary, SaveOnInterrupt) if cb not in have)
        use_run_length_bar(trainer)
        return trainer

    def _ckpt_path(self) -> str | None:
        cfg = self.config.get(self.subcommand) if self.subcommand else None
        ckpt = cfg.get("ckpt_path") if cfg is not None else None
        special = str(ckpt) in ("last", "best", "hpc", "registry") or "://" in str(ckpt)
        if ckpt and not special and not Path(ckpt).exists():  # a file, or a distributed checkpoint's folder
            from s2ft_lightning.attach import CheckpointError

            raise CheckpointError(
                f"checkpoint {ckpt!r} does not exist; pass a .ckpt file (a fit run names its checkpoint at the "
                "end, and <logger dir>/latest/checkpoints/last.ckpt points at the newest run's)"
            )
        return None if not ckpt or special else str(ckpt)

    def before_fit(self) -> None:
        if ckpt := self._ckpt_path():
            from s2ft_lightning.interrupt import check_resume

            check_resume(self.trainer, ckpt)

    def before_validate(self) -> None:
        self._ckpt_path()

    def before_test(self) -> None:
        self._ckpt_path()

    def after_validate(self) -> None:
        self._save_metrics("validate")

    def after_test(self) -> None:
        self._save_metrics("test")

    def _save_metrics(self, stage: str) -> None:
        """Write the evaluation's metrics next to what it evaluated: into the run folder of ``--ckpt_path``
        (``<run>/validate_metrics.json``), else into the trainer's ``default_root_dir``; say where."""
        if not self.trainer.is_global_zero:
            return
        ckpt = self._ckpt_path()
        if ckpt:
            resolved = Path(ckpt).resolve()
            folder = resolved.parent.parent if resolved.parent.name == "checkpoints" else resolved.parent
        else:
            folder = Path(self.trainer.default_root_dir)
        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items()}
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{stage}_metrics.json"
        path.write_text(json.dumps({"checkpoint": str(ckpt) if ckpt else None, "metrics": metrics}, indent=1))
        shown = os.path.relpath(path) if not os.path.relpath(path).startswith("..") else str(path)
        print(f"{stage} metrics ({', '.join(sorted(metrics)) or 'none'}) written to {shown}", flush=True)


def _without_local_loggers(logger):
    """The configured logger(s) less those that make a versioned run folder on disk (CSV, TensorBoard; ``True``
    means Lightning's default, one of them); remote ones (W&B, MLflow, ...) keep logging evaluations."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    loggers = logger if isinstance(logger, (list, tuple)) else [logger]
    kept = [
        lg for lg in loggers if lg not in (None, True, False) and not isinstance(lg, (CSVLogger, TensorBoardLogger))
    ]
    return kept or False


def cli_main(args: list[str] | None = None, run: bool = True) -> S2FTCLI:

    return S2FTCLI(
        S2FTModule,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        parser_class=S2FTArgumentParser,
        parser_kwargs={
            "epilog": ADAPTER_HELP,
            "formatter_class": _RawEpilog,
            **{s: {"usage": f"s2ft {s} [-h] [-c CONFIG] [--print_config] [--OPTION VALUE ...]"} for s in SUBCOMMANDS},
        },
        args=args,
        run=run,
    )


def _raw_epilog_formatter():
    from jsonargparse import DefaultHelpFormatter

    class RawEpilog(DefaultHelpFormatter):
        """Keep the adapter-tools epilog's line breaks."""

        def _fill_text(self, text, width, indent):
            return "".join(indent + line for line in text.splitlines(keepends=True))

    return RawEpilog


_RawEpilog = _raw_epilog_formatter()


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that describe a mistake in the input (their messages say what and how to fix it)."""
    from s2ft_lightning.adapters import AdapterError
    from s2ft_lightning.data.base import DataError
    from s2ft_lightning.demo import DemoModelError
    from s2ft_lightning.interrupt import ResumeError
    from s2ft_lightning.layers import S2InstallError
    from s2ft_lightning.models import ModelLoadError
    from surgery.analyze import StructureError
    from surgery.config import SelectionError
    from surgery.plan import PlanError
    from surgery.verify import VerificationError

    return (
        AdapterError, DataError, DemoModelError, S2InstallError, ModelLoadError, StructureError, SelectionError,
        PlanError, VerificationError, FileNotFoundError, ResumeError,
    )  # fmt: skip


def _misplaced_options(args: list[str]) -> str | None:
    """``--model.o_ratio`` (an S2 setting without ``s2.``): the option the user most likely meant."""
    from s2ft_lightning.pipeline import S2Config

    names = {f.name for f in fields(S2Config)}
    for a in args:
        key = a.split("=", 1)[0]
        if key.startswith("--model.") and key[len("--model.") :] in names:
            return f"unknown option {key}: S²FT settings sit under model.s2, use --model.s2.{key[len('--model.') :]}"
    return None


def _model_path(args: list[str]) -> str | None:
    """The --model.model value from the command line or, failing that, from the --config files (last wins)."""
    value = None
    for i, a in enumerate(args):
        if a in ("--config", "-c") and i + 1 < len(args) and Path(args[i + 1]).is_file():
            import yaml

            try:
                cfg = yaml.safe_load(Path(args[i + 1]).read_text()) or {}
            except yaml.YAMLError:
                continue  # the CLI reports the YAML error itself
            model = cfg.get("model") if isinstance(cfg, dict) else None
            value = model.get("model", value) if isinstance(model, dict) else value
    for i, a in enumerate(args):
        if a == "--model.model" and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith("--model.model="):
            value = a.split("=", 1)[1]
    return value


def _no_litlogger_tip(record: logging.LogRecord) -> bool:
    return "litlogger" not in str(record.msg)


def quiet_third_party() -> None:
    """Silence what other libraries print on every command and that says nothing about the run: torchao's
    "Failed to load ... _C_mxfp8" lines (transformers imports torchao when it is installed; we use none of its
    CUDA kernels), torch's pytree notes about torchao's enums, Lightning's litlogger tip, its LeafSpec
    deprecation under torch >= 2.13 and its note that a resumed run checkpoints into a new folder."""
    from s2ft_lightning.models import quiet_torchao_import

    quiet_torchao_import()
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_no_litlogger_tip)  # added once however often
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    # A resumed run writes into its own new folder by design; ModelCheckpoint warns that the folder changed.
    warnings.filterwarnings("ignore", message=r"The dirpath has changed from")


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``s2ft``."""
    args = sys.argv[1:] if argv is None else argv
    quiet_third_party()
    if args and args[0] == "adapter":
        from s2ft_lightning.adapters.cli import main as adapter_main

        raise SystemExit(adapter_main(args[1:]))
    if hint := _misplaced_options(args):
        print(f"s2ft: error: {hint}", file=sys.stderr)
        raise SystemExit(2)
    try:
        # Before the CLI builds the datamodule, whose tokenizer would fail less clearly; not for --help or
        # --print_config, which only read the recipe (its model need not exist yet).
        reading = any(a in ("-h", "--help") or a.startswith("--print_config") for a in args)
        if (path := _model_path(args)) and not reading:
            from s2ft_lightning.models import check_source

            check_source(path)
        cli_main(argv)  # None: LightningCLI reads sys.argv itself (given both, it warns on every run)
    except Exception as e:
        mistake = _user_error_in(e)
        if mistake is None or os.environ.get("S2FT_TRACEBACK"):
            raise
        print(f"s2ft: error: {mistake}", file=sys.stderr)
        raise SystemExit(2) from None


def _user_error_in(error: BaseException) -> BaseException | None:
    """The user mistake behind ``error``: itself, or the cause jsonargparse wrapped while instantiating a class
    (a datamodule refusing its max_length arrives as "Does not validate against any of the Union subtypes")."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, _user_errors()):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


if __name__ == "__main__":
    main()

"""The `s2ft` command: LightningCLI for fit/validate/test/predict, plus `s2ft adapter …` tools.

Mistakes end in one paragraph on stderr and exit status 2 (`S2FT_TRACEBACK=1` shows the traceback), found
before a model is loaded wherever possible. Every run also prints step lines when stdout is not a terminal
and, at the end of fit, where its files went (`StepLog`, `RunSummary`).
"""

from __future__ import annotations

import os
import sys
from dataclasses import fields
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from s2ft_lightning.module import S2FTModule

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

    def instantiate_trainer(self, **kwargs):
        from s2ft_lightning.reporting import RunSummary, StepLog

        trainer = super().instantiate_trainer(**kwargs)
        have = {type(cb) for cb in trainer.callbacks}
        trainer.callbacks.extend(cb() for cb in (StepLog, RunSummary) if cb not in have)
        return trainer

    def _check_ckpt(self) -> None:
        cfg = self.config.get(self.subcommand) if self.subcommand else None
        ckpt = cfg.get("ckpt_path") if cfg is not None else None
        special = str(ckpt) in ("last", "best", "hpc", "registry") or "://" in str(ckpt)
        if ckpt and not special and not Path(ckpt).is_file():
            from s2ft_lightning.attach import CheckpointError

            raise CheckpointError(
                f"checkpoint {ckpt!r} does not exist; pass a .ckpt file (a fit run names its checkpoint at the "
                "end, and <logger dir>/latest/checkpoints/last.ckpt points at the newest run's)"
            )

    def before_fit(self) -> None:
        self._check_ckpt()

    def before_validate(self) -> None:
        self._check_ckpt()

    def before_test(self) -> None:
        self._check_ckpt()


def cli_main(args: list[str] | None = None, run: bool = True) -> S2FTCLI:
    return S2FTCLI(
        S2FTModule,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"epilog": ADAPTER_HELP, "formatter_class": _RawEpilog},
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
    from s2ft_lightning.layers import S2InstallError
    from s2ft_lightning.models import ModelLoadError
    from surgery.analyze import StructureError
    from surgery.config import SelectionError
    from surgery.plan import PlanError
    from surgery.verify import VerificationError

    return (
        AdapterError, DataError, DemoModelError, S2InstallError, ModelLoadError, StructureError, SelectionError,
        PlanError, VerificationError, FileNotFoundError,
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


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``s2ft``."""
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "adapter":
        from s2ft_lightning.adapters.cli import main as adapter_main

        raise SystemExit(adapter_main(args[1:]))
    if hint := _misplaced_options(args):
        print(f"s2ft: error: {hint}", file=sys.stderr)
        raise SystemExit(2)
    try:
        if (path := _model_path(args)) and "--help" not in args and "-h" not in args:
            from s2ft_lightning.models import check_source

            check_source(path)  # before the CLI builds the datamodule, whose tokenizer would fail less clearly
        cli_main(argv)  # None: LightningCLI reads sys.argv itself (given both, it warns on every run)
    except _user_errors() as e:
        if os.environ.get("S2FT_TRACEBACK"):
            raise
        print(f"s2ft: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()

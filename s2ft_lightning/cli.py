"""The `s2ft` command: LightningCLI for fit/validate/test/predict, plus `s2ft adapter …` tools."""

from __future__ import annotations

import sys

from lightning.pytorch.cli import LightningCLI

from s2ft_lightning.module import S2FTModule


class S2FTCLI(LightningCLI):
    """LightningCLI whose optimizer/scheduler are injected into S2FTModule as callables."""

    def add_arguments_to_parser(self, parser) -> None:
        # The datamodule reads its tokenizer from the model path unless told otherwise.
        parser.link_arguments("model.model", "data.init_args.tokenizer", apply_on="parse")


def cli_main(args: list[str] | None = None, run: bool = True) -> S2FTCLI:
    return S2FTCLI(
        S2FTModule,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "adapter":
        from s2ft_lightning.adapters.cli import main as adapter_main

        raise SystemExit(adapter_main(args[1:]))
    cli_main(argv)  # None: LightningCLI reads sys.argv itself (given both, it warns on every run)


if __name__ == "__main__":
    main()

"""`s2ft adapter inspect|merge|export|fuse`: work with S²FT adapter directories from the shell.

- inspect DIR [--json]: what each adapter touches, its base, size, and overlaps between adapters.
- merge DIR --out MODEL_DIR [--base PATH] [--name N ...] [--scale S ...] [--dtype D]: merge adapters into
  the base and write a stock Hugging Face folder (``save_pretrained``), reloaded and checked before kept.
- export DIR --out ADAPTER_DIR [--name N] [--base PATH]: a standalone, re-validated copy of one adapter
  (e.g. out of a multi-adapter directory), optionally checked against a base.
- export-lora DIR --out LORA_DIR [--name N] [--base PATH] [--max-rank R]: the adapter as an exact PEFT LoRA
  adapter (``PeftModel.from_pretrained`` and LoRA serving stacks load it).
- fuse DIR [DIR ...] --out ADAPTER_DIR [--weights W ...] [--overlap sum|mean]: combine adapters into one.

``--out`` must be a new or an empty folder; ``--force`` replaces an existing one (all-or-nothing: the old folder
stays until the new one is complete), never the command's own inputs. Mistakes end in one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from s2ft_lightning.adapters.bank import AdapterBank
from s2ft_lightning.adapters.files import load_adapter, load_adapters, save_adapter
from s2ft_lightning.adapters.format import Adapter, AdapterError, check_base
from s2ft_lightning.adapters.fusion import fuse_adapters
from s2ft_lightning.atomic import atomic_directory

DTYPES = ("auto", "float32", "bfloat16", "float16")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the mistake and where the options are listed, no usage dump."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` lists the options)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="s2ft adapter", description="Inspect, merge, export and fuse S2FT adapters.")
    sub = p.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("inspect", help="summarise an adapter directory")
    i.add_argument("path", help="S2FT adapter directory (adapter_config.json + adapter_model.safetensors)")
    i.add_argument("--json", action="store_true", help="print JSON instead of text")
    m = sub.add_parser("merge", help="merge adapters into the base and save a stock model folder")
    m.add_argument("path", help="S2FT adapter directory (adapter_config.json + adapter_model.safetensors)")
    m.add_argument("--out", required=True, help="folder for the merged model (new or empty; see --force)")
    m.add_argument("--base", help="base model folder (default: base_model recorded in the adapter)")
    m.add_argument("--name", nargs="*", default=None, help="adapters of a multi-adapter directory (default: all)")
    m.add_argument("--scale", nargs="*", type=float, default=None, help="one scale per merged adapter")
    m.add_argument("--dtype", choices=DTYPES, default="auto", help="dtype of the merged model (auto: as stored)")
    e = sub.add_parser("export", help="write a standalone, validated copy of one adapter")
    e.add_argument("path", help="S2FT adapter directory (adapter_config.json + adapter_model.safetensors)")
    e.add_argument("--out", required=True, help="folder for the copy (new or empty; see --force)")
    e.add_argument("--name", default=None, help="the adapter of a multi-adapter directory")
    e.add_argument("--base", default=None, help="also check the adapter against this base model folder")
    x = sub.add_parser("export-lora", help="write one adapter as an exact PEFT LoRA adapter directory")
    x.add_argument("path", help="S2FT adapter directory (adapter_config.json + adapter_model.safetensors)")
    x.add_argument("--out", required=True, help="folder for the PEFT LoRA adapter (new or empty; see --force)")
    x.add_argument("--name", default=None, help="the adapter of a multi-adapter directory")
    x.add_argument("--base", default=None, help="also check the adapter against this base model folder")
    x.add_argument("--max-rank", type=int, default=None, help="refuse modules that need a larger LoRA rank")
    f = sub.add_parser("fuse", help="combine adapters into one (sum / weighted sum / mean on overlaps)")
    f.add_argument("paths", nargs="+", help="adapter directories (multi-adapter directories contribute all)")
    f.add_argument("--out", required=True, help="folder for the fused adapter (new or empty; see --force)")
    f.add_argument("--weights", nargs="*", type=float, default=None, help="one weight per adapter (default: 1 each)")
    f.add_argument("--overlap", choices=["sum", "mean"], default="sum", help="how overlapping deltas combine")
    f.add_argument("--fused-name", default="fused", help="name of the fused adapter")
    for command in (m, e, x, f):
        command.add_argument("--force", action="store_true", help="replace --out if it exists (never an input)")
    return p


def _check_out(args) -> None:
    """Refuse an ``--out`` that holds something unless ``--force``; never let it replace an input."""
    out = Path(args.out)
    inputs = [*getattr(args, "paths", []), *([args.path] if getattr(args, "path", None) else [])]
    inputs += [args.base] if getattr(args, "base", None) else []
    for given in inputs:
        src = Path(given).resolve()
        if Path(given).exists() and (out.resolve() == src or out.resolve() in src.parents):
            raise FileExistsError(f"--out {args.out} would replace the input {given}; pass another --out")
    if not out.exists() and not out.is_symlink():
        return
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        return  # an empty folder: filled (replaced by the complete output)
    if not args.force:
        raise FileExistsError(f"--out {args.out} already exists; pass --force to replace it, or another --out")
    if not out.is_dir() or out.is_symlink():
        raise FileExistsError(f"--out {args.out} is not a folder; --force replaces folders only")


def _summary(name: str, a: Adapter) -> dict:
    rows = sum(len(b.indices) for b in a.blocks if b.feature == "out")
    cols = sum(len(b.indices) for b in a.blocks if b.feature == "in")
    return {
        "name": name,
        "base_model": a.base_model,
        "base_fingerprint": a.base_fingerprint,
        "base_values_sha256": a.base_values_sha256,
        "num_params": a.num_params,
        "modules": len(a.modules),
        "rows": rows,
        "columns": cols,
        "blocks": {b.key: len(b.indices) for b in a.blocks},
        "metadata": a.metadata,
    }


def _inspect(args) -> int:
    ads = load_adapters(args.path)
    info = {"adapters": [_summary(n, a) for n, a in ads.items()]}
    if len(ads) > 1:
        _, report = fuse_adapters(ads)
        info["overlaps"] = {k: len(v) for k, v in report.overlaps.items()}
    if args.json:
        print(json.dumps(info, indent=1, default=str))
        return 0
    for s in info["adapters"]:
        print(f"adapter {s['name']!r}: {s['num_params']:,} weights in {s['modules']} modules "
              f"({s['rows']} rows, {s['columns']} columns)")  # fmt: skip
        print(f"  base {s['base_model']} fingerprint {s['base_fingerprint']} values {s['base_values_sha256']}")
    if "overlaps" in info:
        print("overlaps between adapters: " + (json.dumps(info["overlaps"]) if info["overlaps"] else "none"))
    return 0


def _load_base(path: str | None, ads: list[Adapter], dtype: str) -> tuple[torch.nn.Module, Any, str]:
    """(model, its tokenizer or None, where it came from) for --base or the base recorded in the adapter."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from s2ft_lightning.models import resolve_dtype, resolve_path

    path = path or ads[0].base_model
    if not path:
        raise AdapterError("the adapter records no base model; pass --base with the base model's folder")
    folder = resolve_path(path)  # prepares the demo model once for "demo:smollm2"
    if not (folder / "config.json").is_file():
        raise AdapterError(f"base model folder {str(folder)!r} not found (no config.json); pass --base <folder>")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=resolve_dtype(dtype), local_files_only=True)
    try:  # the merged folder gets the base's tokenizer as stored, when it has one
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer, str(path)


def _merge(args) -> int:
    ads = load_adapters(args.path)
    names = args.name or list(ads)
    missing = [n for n in names if n not in ads]
    if missing:
        raise AdapterError(f"no adapter {missing[0]!r} in {args.path!r} (have {sorted(ads)})")
    scales = args.scale or [1.0] * len(names)
    if len(scales) != len(names):
        raise AdapterError(f"{len(scales)} scales given for {len(names)} adapters")
    model, tokenizer, base_path = _load_base(args.base, [ads[n] for n in names], args.dtype)
    bank = AdapterBank(model)
    for n in names:
        bank.add(ads[n], n)  # every adapter is checked against the base before anything is merged
    for n, s in zip(names, scales):
        bank.merge(n, s)
    with atomic_directory(args.out) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _check_reload(model, tmp)
    print(f"merged {names} (scales {scales}) into {base_path} -> {args.out}")
    return 0


def _check_reload(model, folder: Path) -> None:
    """The saved folder must load in stock transformers and give the in-memory merged model's logits."""
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=model.dtype)
    vocab = int(getattr(model.config, "vocab_size", 2) or 2)
    ids = torch.randint(0, vocab, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model.eval()(ids).logits, reloaded.eval()(ids).logits
    if not torch.equal(a, b):
        raise AdapterError(
            f"the saved merged model does not reproduce the merged logits (max diff {(a - b).abs().max()})"
        )


def _export(args) -> int:
    adapter = load_adapter(args.path, args.name)
    if args.base:
        model, _, _ = _load_base(args.base, [adapter], "auto")
        check_base(model, adapter)
    save_adapter(adapter, args.out)
    print(f"exported adapter {adapter.name!r} ({adapter.num_params:,} weights) -> {args.out}")
    return 0


def _export_lora(args) -> int:
    from s2ft_lightning.adapters.peft_export import export_peft_lora

    adapter = load_adapter(args.path, args.name)
    if args.base:
        model, _, _ = _load_base(args.base, [adapter], "auto")
        check_base(model, adapter)
    ranks = export_peft_lora(adapter, args.out, max_rank=args.max_rank)
    distinct = sorted(set(ranks.values()))
    shown = ("rank " if len(distinct) == 1 else "ranks ") + ", ".join(map(str, distinct))
    print(f"exported {adapter.name!r} as a PEFT LoRA adapter ({len(ranks)} modules, {shown}) -> {args.out}")
    return 0


def _fuse(args) -> int:
    ads: dict[str, Adapter] = {}
    for p in args.paths:
        for n, a in load_adapters(p).items():
            key = n if n not in ads else f"{Path(p).name}/{n}"
            ads[key] = a
    fused, report = fuse_adapters(ads, weights=args.weights, overlap=args.overlap, name=args.fused_name)
    save_adapter(fused, args.out)
    print(f"fused {list(ads)} -> {args.out} ({fused.num_params:,} weights); {report.summary()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``s2ft adapter``; returns the exit status (2 for a refused input, with the reason)."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if getattr(args, "out", None):
            _check_out(args)
        cmds = {"inspect": _inspect, "merge": _merge, "export": _export, "export-lora": _export_lora, "fuse": _fuse}
        code = cmds[args.cmd](args)
        sys.stdout.flush()
        return code
    except (AdapterError, FileExistsError) as e:
        print(f"s2ft adapter {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`... | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    raise SystemExit(main())

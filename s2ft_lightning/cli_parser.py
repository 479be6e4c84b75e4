"""The `s2ft` argument parser: every parser mistake in one paragraph, help that starts with S²FT's options.

jsonargparse reports a mistake as ~65 lines of usage followed by a nested message. `S2FTArgumentParser.error`
prints one line instead: the option (as typed, or the key and the YAML file it is in), what is wrong with it, the
fix and, where it applies, "did you mean"; exit status 2. ``s2ft fit --help`` lists the model's and S²FT's
options, then the data module's (every shipped datamodule's, not only ``--data.help CLASS``), then Lightning's.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import re
import sys
import textwrap
from collections.abc import Iterable
from contextvars import ContextVar
from pathlib import Path
from typing import Any, NoReturn

from lightning.pytorch.cli import LightningArgumentParser

# The arguments being parsed (set by the CLI): errors name options as the user typed them.
ARGV: ContextVar[list[str] | None] = ContextVar("s2ft_argv", default=None)
SUBCOMMANDS = ("fit", "validate", "test", "predict")
SHIPPED_DATAMODULES = ("ReasoningGymDataModule", "InstructionDataModule", "PlainTextDataModule")
# Where a short class name given to --data / optimizer / scheduler is looked up for "did you mean".
_SHORT_NAME_MODULES = ("s2ft_lightning.data", "s2ft_lightning", "torch.optim", "torch.optim.lr_scheduler")


class S2FTArgumentParser(LightningArgumentParser):
    """LightningArgumentParser with one-paragraph errors and S²FT-first help."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):
            super().error(message, ex)  # raises (internal parsers, debugging)
        argv = ARGV.get()
        argv = sys.argv[1:] if argv is None else argv
        sys.stderr.write(f"{_command(argv)}: error: {explain(message, self, argv)}\n")
        self.exit(2)

    def format_help(self) -> str:
        groups = self._action_groups
        if not any(a.dest == "data" for g in groups for a in g._group_actions):
            return super().format_help()
        data_group = next(g for g in groups if any(a.dest == "data" for a in g._group_actions))
        title = data_group.title
        data_group.title = DATA_TITLE
        self._action_groups = sorted(groups, key=_help_rank)
        try:
            text = super().format_help()
        finally:
            self._action_groups, data_group.title = groups, title
        return _insert_after_block(text, DATA_TITLE + ":", shipped_data_help())


DATA_TITLE = "Data (--data CLASS picks the datamodule, --data.NAME VALUE sets an option; the shipped ones follow)"


def _help_rank(group: Any) -> int:
    """Help order: plain options, the model and S²FT, data, the subcommand's own, links, Lightning's Trainer."""
    dests = [a.dest for a in group._group_actions]
    first = dests[0] if dests else ""
    if group.title in ("positional arguments", "options") or not dests:
        return 0
    for rank, prefix in ((1, "model"), (2, "data"), (5, "trainer")):
        if first == prefix or first.startswith(prefix + "."):
            return rank
    return 4 if group.title == "Linked arguments" else 3


def _insert_after_block(text: str, heading: str, extra: str) -> str:
    """``extra`` after the paragraph that starts with the line ``heading`` (or at the end)."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(heading)), None)
    if start is None:
        return text.rstrip("\n") + "\n\n" + extra
    end = next((i for i in range(start + 1, len(lines)) if not lines[i].strip()), len(lines))
    return "\n".join([*lines[:end], "", extra.rstrip("\n"), *lines[end:]]) + "\n"


def shipped_data_help() -> str:
    """The options of the shipped datamodules as help text: each one's own, then those all of them share."""
    from s2ft_lightning import data
    from s2ft_lightning.data.base import TokenizedDataModule

    common = _init_defaults(TokenizedDataModule)
    sections = []
    for name in SHIPPED_DATAMODULES:
        cls = getattr(data, name)
        own = _init_defaults(cls)
        skip = {"tokenizer"} | {k for k in common if own.get(k, object()) == common[k]}
        sections.append(_options_help(cls, skip, f"{name} (--data {name})"))
    shared = _options_help(TokenizedDataModule, {"tokenizer"}, "Every shipped datamodule", doc=False)
    return "\n".join([*sections, shared])


def _init_defaults(cls: type) -> dict[str, Any]:
    sig = inspect.signature(cls.__init__)
    return {n: p.default for n, p in sig.parameters.items() if n != "self" and p.kind is not p.VAR_KEYWORD}


def _options_help(cls: type, skip: set[str], title: str, doc: bool = True) -> str:
    """``cls``'s constructor options as ``--data.NAME`` help lines (jsonargparse's own formatting), titled."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="s2ft fit")
    parser.add_class_arguments(cls, "data", skip=skip)
    lines = parser.format_help().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("  --data CONFIG"))
    about = lines[start - 1].rstrip(":") if doc else ""
    body = [line for line in lines[start + 1 :] if line.strip()]
    return "\n".join([f"{title}: {about}" if about else f"{title}:", *body, ""])


# ---- one-paragraph errors ---------------------------------------------------------------------------------------
def _command(argv: list[str]) -> str:
    sub = next((a for a in argv if a in SUBCOMMANDS), None)
    return f"s2ft {sub}" if sub else "s2ft"


def explain(message: str, parser: Any, argv: list[str]) -> str:
    """One line saying which option is wrong, why, and how to fix it, from a jsonargparse error message."""
    prefix, message = _unwrap(message)
    first, _, rest = message.partition("\n")
    first = first.strip()
    command = _command(argv)
    hint = f"`{command} --help` lists every option"
    parser = _subcommand_parser(parser, argv)
    if first.startswith("unrecognized arguments:"):
        given = first.split(":", 1)[1].split()
        name = next((a for a in given if a.startswith("-")), given[0] if given else "").split("=", 1)[0]
        return f"unknown option {name}{_did_you_mean(name, _options(parser), prefix='--')}; {hint}"
    if first.startswith("Problems parsing config"):
        bad = [f for f in _config_files(argv) if f not in {f for _, f in _config_trees(argv)}]
        where = f"--config {bad[0]}" if bad else "the config"
        detail = " ".join(message.split(":", 1)[1].split()).replace('in "<unicode string>", ', "at ")
        return f"{where} is not valid YAML: {detail}"
    if first.startswith('expected "subcommand"'):
        return "no command given: s2ft fit | validate | test | predict | adapter ... (`s2ft --help` says more)"
    if m := re.match(r"argument subcommand: invalid choice: '([^']*)'", first):
        close = difflib.get_close_matches(m[1], [*SUBCOMMANDS, "adapter"], n=1)
        mean = f" (did you mean {close[0]}?)" if close else ""
        return f"unknown command {m[1]!r}{mean}; the commands are fit, validate, test, predict and adapter"
    if m := re.match(r"Group '([^']+)' does not accept option '([^']+)'", first):
        return _unknown_key(_join(prefix, f"{m[1]}.{m[2]}"), parser, argv, hint)
    if m := re.match(r"Subcommand '[^']+' does not accept option '([^']+)'", first):
        return _unknown_key(_join(prefix, m[1]), parser, argv, hint)
    if m := re.match(r"Option '([^']+)' is not accepted", first):
        return _unknown_key(_join(prefix, m[1]), parser, argv, hint)
    if m := re.match(r'Parser key "([^"]+)":\s*(.*)', first):
        detail = (m[2] + "\n" + rest).strip()
        if m[1] == "config" and not prefix:
            return _bad_config_file(detail, argv)
        return _bad_value(_join(prefix, m[1]), detail, parser, argv, hint)
    return " ".join(message.split()) + f"; {hint}"


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _unwrap(message: str) -> tuple[str, str]:
    """(key prefix, innermost message) of jsonargparse's nested errors: the mistake in a class's own options
    (``--data.batch_sise``, ``--model.optimizer.lr abc``) arrives wrapped in the errors of every type tried."""
    prefix = ""
    while m := re.match(r'Parser key "([^"]+)":\s*(.*)', message, flags=re.S):
        key, body = m[1], m[2]
        if inner := re.search(
            r"Problem with given class_path '[^']*':\n(.*?)(?=\n {0,4}- |\n {0,2}Given value|\Z)", body, flags=re.S
        ):
            message = textwrap.dedent(inner[1]).strip()
        elif inner := re.search(r"expects a function or a callable class: (.*)\. Got value: ", body, flags=re.S):
            message = inner[1].strip()
        else:
            break
        prefix = _join(prefix, key)
    return prefix, message


def _subcommand_parser(parser: Any, argv: list[str]) -> Any:
    """The parser of the subcommand in ``argv`` (errors may be raised by the root parser)."""
    sub = next((a for a in argv if a in SUBCOMMANDS), None)
    action = getattr(parser, "_subcommands_action", None)
    if sub and action is not None and sub in getattr(action, "choices", {}):
        return action.choices[sub]
    return parser


def _options(parser: Any) -> list[str]:
    """The parser's option names without leading dashes, e.g. ``model.s2.d_ratio``."""
    names = []
    for action in parser._actions:
        for s in action.option_strings:
            if s.startswith("--") and not s.endswith(".help"):
                names.append(s[2:])
    return names


def _norm(key: str) -> str:
    return key.replace(".init_args.", ".").removesuffix(".init_args")


def _did_you_mean(name: str, candidates: Iterable[str], prefix: str = "") -> str:
    """`` (did you mean X?)`` for the closest candidates: by spelling, or by the last component alone."""
    bare = _norm(name.lstrip("-"))
    pool = sorted({_norm(c) for c in candidates})
    close = difflib.get_close_matches(bare, pool, n=2, cutoff=0.6)
    leaf = bare.rsplit(".", 1)[-1]
    same_leaf = [c for c in pool if c.rsplit(".", 1)[-1] == leaf and c != bare]
    leaf_close = difflib.get_close_matches(leaf, {c.rsplit(".", 1)[-1] for c in pool}, n=1, cutoff=0.75)
    if not close and leaf_close:
        parent = bare.rsplit(".", 1)[0] + "." if "." in bare else ""
        close = [c for c in pool if c == parent + leaf_close[0]] or [c for c in pool if c.endswith("." + leaf_close[0])]
    # ``--model.model_name_or_path`` most likely meant the option its name starts with (``--model.model``)
    stem = [c for c in pool if bare.startswith(c + "_") and c.rsplit(".", 1)[0] == bare.rsplit(".", 1)[0]]
    picks = list(dict.fromkeys([*same_leaf, *stem, *close]))[:2]
    return f" (did you mean {' or '.join(prefix + p for p in picks)}?)" if picks else ""


def _config_files(argv: list[str]) -> list[Path]:
    files = []
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            files.append(Path(a.split("=", 1)[1]))
        elif a in ("--config", "-c") and i + 1 < len(argv):
            files.append(Path(argv[i + 1]))
    return [f for f in files if f.is_file()]


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys of a YAML tree (list items share their list's key), ``init_args`` left out."""
    out: dict[str, Any] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            key = _norm(f"{prefix}.{k}" if prefix else str(k))
            out[key] = v
            out.update(_flatten(v, key))
    elif isinstance(tree, list):
        for item in tree:
            out.update(_flatten(item, prefix))
    return out


def _config_trees(argv: list[str]) -> list[tuple[dict[str, Any], Path]]:
    """(flattened keys, file) of every --config file that parses."""
    import yaml

    trees = []
    for f in _config_files(argv):
        try:
            trees.append((_flatten(yaml.safe_load(f.read_text())), f))
        except yaml.YAMLError:
            continue
    return trees


def _config_keys(argv: list[str]) -> list[tuple[str, Path]]:
    return [(k, f) for flat, f in _config_trees(argv) for k in flat]


def _cli_option(key: str, argv: list[str]) -> str | None:
    """The option in ``argv`` that sets ``key`` (a dotted key, or only its last component), as typed."""
    want = _norm(key)
    for a in argv:
        if not a.startswith("--"):
            continue
        name = _norm(a[2:].split("=", 1)[0].removesuffix("+"))
        if name == want or name.endswith("." + want):
            return a.split("=", 1)[0]
    return None


def _class_path_of(prefix: str, argv: list[str]) -> str | None:
    """The class chosen for ``prefix`` (e.g. data, model.optimizer) in the configs or on the command line."""
    value = None
    for flat, _ in _config_trees(argv):
        value = flat.get(prefix + ".class_path", value)
    for i, a in enumerate(argv):
        if a in (f"--{prefix}", f"--{prefix}.class_path") and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith((f"--{prefix}=", f"--{prefix}.class_path=")):
            value = a.split("=", 1)[1]
    return value if isinstance(value, str) else None


def _init_params(class_path: str | None) -> list[str]:
    """Constructor parameters of a class path (following ``**kwargs`` into base classes)."""
    cls = _import_class(class_path) if class_path else None
    if cls is None:
        return []
    names: list[str] = []
    for klass in inspect.getmro(cls):
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        names += [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return list(dict.fromkeys(names))


def _import_class(path: str) -> type | None:
    candidates = [path] if "." in path else [f"{m}.{path}" for m in _SHORT_NAME_MODULES]
    for candidate in candidates:
        module, _, name = candidate.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError):
            continue
        if inspect.isclass(cls):
            return cls
    return None


def _unknown_key(key: str, parser: Any, argv: list[str], hint: str) -> str:
    """An option or YAML key no class takes: where it is, and the closest accepted names."""
    typed = _cli_option(key, argv)
    where_key = next((k for k, _ in _config_keys(argv) if k == _norm(key) or k.endswith("." + _norm(key))), None)
    full = _norm(typed[2:]) if typed else where_key or _norm(key)
    owner = full.rsplit(".", 1)[0] if "." in full else ""
    candidates = _options(parser)
    if owner:
        candidates += [f"{owner}.{p}" for p in _init_params(_class_path_of(owner, argv))]
    if typed:
        return f"unknown option {typed}{_did_you_mean(typed, candidates, prefix='--')}; {hint}"
    files = [f for k, f in _config_keys(argv) if k == full]
    where = f" in {files[-1]}" if files else ""
    return f"unknown key {full}{where}{_did_you_mean(full, candidates)}; remove or rename it ({hint})"


def _expected(detail: str) -> tuple[list[str], list[str]]:
    """(type words, literal choices) that a jsonargparse type error lists as expected."""
    words, choices = [], []
    for m in re.finditer(r"Expected a (.+?)(?:\. Got value|$)", detail, flags=re.M):
        t = m[1].strip()
        if lit := re.match(r"typing\.Literal\[(.*)\]", t):
            choices += [c.strip().strip("'\"") for c in lit[1].split(",")]
        elif "int'>" in t:
            words.append("an integer")
        elif "float'>" in t:
            words.append("a number")
        elif "bool'>" in t:
            words.append("true or false")
        elif "NoneType" in t:
            words.append("null")
        elif "dot import path" in t:
            words.append("a class path (e.g. package.module.Class)")
        elif "path but" in t:
            words.append("a file")
    words = list(dict.fromkeys(words))
    if len(words) + bool(choices) > 1:  # jsonargparse also tries the value as a config file, a class and null
        words = [w for w in words if w not in ("a file", "null")]
    if len(words) + bool(choices) > 1 and "a class path (e.g. package.module.Class)" in words:
        words.remove("a class path (e.g. package.module.Class)")
    return words, list(dict.fromkeys(choices))


def _given(detail: str, option: str | None, argv: list[str]) -> str | None:
    if m := re.search(r"(?:Got|Given) value: (.*)$", detail, flags=re.M):
        return m[1].strip()
    if option and option in argv and argv.index(option) + 1 < len(argv):
        return argv[argv.index(option) + 1]
    return None


def _bad_value(key: str, detail: str, parser: Any, argv: list[str], hint: str) -> str:
    """A value of the wrong type or outside the choices: the option, the value, what it takes."""
    typed = _cli_option(key, argv)
    full = _norm(typed[2:]) if typed else _norm(key)
    files = [f for k, f in _config_keys(argv) if k == full or k.endswith("." + full)]
    name = typed or (f"{full} in {files[-1]}" if files else f"--{full}")
    value = _given(detail, typed, argv)
    if "Unable to load config" in detail:
        return f"{name}: {value or 'the value'} is neither a YAML/JSON file nor a mapping of its options; {hint}"
    if full == "data" and value is not None:
        mean = _did_you_mean(value, SHIPPED_DATAMODULES)
        return (
            f"{name} {value!r} is not a datamodule class{mean}; the shipped ones are {', '.join(SHIPPED_DATAMODULES)}"
            ", any other LightningDataModule by its class path (package.module.Class)"
        )
    words, choices = _expected(detail)
    if value is not None and value.lower() in ("nan", "inf", "-inf", "+inf") and "a number" in words:
        words = ["a finite number"]
    wants = words + ([f"one of {', '.join(choices)}"] if choices else [])
    what = " or ".join(wants) if wants else "a value of its type"
    mean = ""
    if choices and value is not None:
        close = difflib.get_close_matches(value, choices, n=1, cutoff=0.5)
        mean = f" (did you mean {close[0]}?)" if close else ""
    about = _option_help(parser, full)
    shown = f" {value!r}" if value is not None else ""
    return f"{name}{shown} is not {what}{mean}{about}; {hint}"


def _option_help(parser: Any, key: str) -> str:
    """`` (<first sentence of the option's help>)`` when the parser has help for ``key``."""
    for action in parser._actions:
        if _norm(action.dest) == key and action.help and action.help != "==SUPPRESS==":
            text = " ".join(str(action.help).split())
            first = re.split(r"(?<=\.)\s+(?=[A-Z])", text, maxsplit=1)[0].rstrip(".")
            return f" ({first})" if len(first) <= 200 else ""
    return ""


def _bad_config_file(detail: str, argv: list[str]) -> str:
    """A --config that is missing, a folder, or not readable: the path as typed and what to pass."""
    m = re.search(r"'([^']+)'", detail)
    named = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--config", "-c")]
    named += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    path = Path(m[1]) if m else Path(named[0] if named else "?")
    shown = next((n for n in named if Path(n).resolve() == path.resolve()), str(path))
    if path.is_dir():
        return f"--config {shown}: is a folder, not a YAML file; pass a recipe file such as configs/quickstart.yaml"
    if not path.exists():
        return (
            f"--config {shown}: no such file (relative paths start at {Path.cwd()}); the recipes are in configs/, "
            "e.g. configs/quickstart.yaml"
        )
    return f"--config {shown}: " + " ".join(detail.split())

"""The conventions every `megalodon` verb shares: options spelled --snake_case or --kebab-case, help that shows
defaults, a close name for a misspelled option, `--device auto`, and logging set up for the command's messages.

Options are declared in kebab-case; `Parser` rewrites `--max_new_tokens` to `--max-new-tokens` before argparse
sees it (only option names: values and anything after a bare `--` are left alone).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import difflib
import inspect
import io
import logging
import sys
import textwrap
import tokenize

SPELLING_NOTE = "Every option may be spelled --snake_case or --kebab-case."


def kebab(token: str) -> str:
    """`--max_new_tokens=5` -> `--max-new-tokens=5`; anything that is not a long option is returned as is."""
    if not token.startswith("--") or token == "--":
        return token
    name, eq, value = token.partition("=")
    return "--" + name[2:].replace("_", "-") + eq + value


def kebab_args(args: list[str]) -> list[str]:
    """Every long option name in kebab-case, up to a bare `--` (after it everything is a value)."""
    if "--" in args:
        cut = args.index("--")
        return [kebab(a) for a in args[:cut]] + args[cut:]
    return [kebab(a) for a in args]


class HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default, unless it is unset (None, False, an empty list) or the help names it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        unset = default is None or default is False or default is argparse.SUPPRESS or default == []
        if "%(default)" in text or unset or not action.option_strings or action.nargs == 0:
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse with the shared conventions (subcommand parsers are made of this class too)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)  # an abbreviation would silently mean whichever option it prefixes
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        return super().parse_known_args(kebab_args(list(sys.argv[1:] if args is None else args)), namespace)


def unknown_option_error(parser: argparse.ArgumentParser, extra: list[str], original: list[str]) -> str:
    """The message for arguments a verb does not take: the first unknown option with the closest known one, in the
    user's own spelling (`--max_stesp` -> did you mean 'max_steps'?)."""
    options = [a for a in extra if a.startswith("-")]
    if not options:
        return f"unrecognized arguments: {' '.join(extra)}"
    typed = options[0].partition("=")[0]
    spelled = next((o.partition("=")[0] for o in original if kebab(o.partition("=")[0]) == typed), typed)
    snake = "_" in spelled
    name = spelled.lstrip("-")
    positional = _positional_named(parser, name)
    if positional is not None:  # `--model PATH` for the model directory: a name that is not an option here
        metavar = positional.metavar or positional.dest.upper()
        return (f"unknown option {name!r}: {positional.dest} is positional, given without a dash "
                f"({parser.prog} {metavar} ...)")
    known = [s for action in parser._actions for s in action.option_strings  # noqa: SLF001
             if s.startswith("--") and s != "--help"]  # `--model` is not a misspelled --help
    close = difflib.get_close_matches(typed, known, n=1, cutoff=0.7)
    if not close:
        return f"unknown option {name!r} (see {parser.prog} --help)"
    suggestion = close[0].lstrip("-").replace("-", "_") if snake else close[0].lstrip("-")
    return f"unknown option {name!r} (did you mean {suggestion!r}?)"


def _positional_named(parser: argparse.ArgumentParser, name: str) -> argparse.Action | None:
    """The positional argument that an option of this name most likely meant (`model` or `model_dir` for
    `model_dir`), or None."""
    name = name.replace("-", "_")
    for action in parser._actions:  # noqa: SLF001
        dest = action.dest
        if not action.option_strings and dest != "help" and len(name) >= 3 and \
                (dest == name or dest.startswith(name + "_") or dest.endswith("_" + name)):
            return action
    return None


# ---- device and logging ------------------------------------------------------------------------------------------
def add_device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="torch device: auto (CUDA when present, else CPU), cpu, "
                                                         "cuda or cuda:N")


def resolve_device(spec: str) -> str:
    """`auto` -> `cuda` when a GPU is visible, else `cpu`; any other spec unchanged."""
    if spec != "auto":
        return spec
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def add_verbosity_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="store_true", help="also print debugging messages")
    group.add_argument("-q", "--quiet", action="store_true", help="print only warnings and errors (and the output)")


class _LevelPrefix(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno == logging.INFO else f"{record.levelname.lower()}: {text}"


@contextlib.contextmanager
def command_logging(verbose: bool = False, quiet: bool = False):
    """While a command runs, the library's `megalodon.*` loggers print to stderr, one plain line per message
    (INFO and up by default); the library alone configures nothing."""
    root = logging.getLogger("megalodon")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LevelPrefix("%(message)s"))
    root.addHandler(handler)
    level = root.level
    root.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


# ---- dataclass fields as options ---------------------------------------------------------------------------------
def field_docs(cls) -> tuple[dict[str, str], dict[str, str]]:
    """(help, section) of each field of a dataclass, read from its source: the comment at the end of the field's
    line is its help (or `metadata={"help": ...}`), and the last comment line above it names its section."""
    fields = dataclasses.fields(cls)
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (a frozen application): the metadata alone
        return {f.name: f.metadata.get("help", "") for f in fields}, {}
    lines = source.splitlines()
    comments = {token.start[0]: token.string.lstrip("#").strip()
                for token in tokenize.generate_tokens(io.StringIO(source).readline) if token.type == tokenize.COMMENT}
    names = {f.name for f in fields}
    helps, sections, section, previous_end = {}, {}, "", 0
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id in names):
            continue
        for line in range(previous_end + 1, node.lineno):  # comment lines of their own above the field
            if line in comments and lines[line - 1].lstrip().startswith("#"):
                section = comments[line]
        name = node.target.id
        helps[name] = cls.__dataclass_fields__[name].metadata.get("help") or comments.get(node.end_lineno, "")
        sections[name] = section
        previous_end = node.end_lineno
    return helps, sections

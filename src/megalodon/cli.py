"""The `megalodon` command: one subcommand per job."""

from __future__ import annotations

import argparse
import errno
import os
import sys
import warnings
from pathlib import Path


def _convert(args: argparse.Namespace) -> int:
    from megalodon.files import check_output_path, replace_directory, replace_file

    given = [f"--{name.replace('_', '-')}" for name in ("config", "vocab_size", "tokenizer")
             if getattr(args, name) is not None]
    if given and args.direction != "from-reference":
        raise ValueError(f"{', '.join(given)} {'apply' if len(given) > 1 else 'applies'} to from-reference only "
                         f"(they describe a reference checkpoint; {args.direction} reads what it needs from its "
                         "source)")
    output = check_output_path(args.output, args.overwrite, "the output", is_file=args.direction == "to-reference")
    if args.direction == "from-reference":
        model, tokenizer = _from_reference(args)

        def save(path: Path) -> None:
            model.save_pretrained(path)
            if tokenizer is not None:
                tokenizer.save(path)

        replace_directory(output, save)
        print(f"wrote {output} ({model.num_parameters():,} parameters"
              f"{', with tokenizer' if tokenizer is not None else '; no tokenizer: add one with --tokenizer'})")
    elif args.direction == "to-reference":
        from megalodon import Megalodon
        from megalodon.convert import to_reference

        model = Megalodon.from_pretrained(args.source)
        tensors = to_reference(model)
        replace_file(output, lambda path: _write_reference(tensors, path, output.suffix, model.config.share_emb))
        print(f"wrote {output} ({len(tensors)} reference keys)")
    elif args.direction == "to-hf":
        export_hf = _hf_adapter().export_hf

        tokenizer = args.source if (Path(args.source) / "tokenizer_config.json").is_file() else None
        replace_directory(output, lambda path: export_hf(args.source, path, tokenizer=tokenizer))
        print(f"wrote {output} (transformers layout{', with tokenizer' if tokenizer else ''})")
    elif args.direction == "consolidate":  # a sharded checkpoint of a run on several ranks
        from megalodon.training.dist_checkpoint import consolidate

        replace_directory(output, lambda path: consolidate(args.source, path))
        print(f"wrote {output}")
    else:
        import_hf = _hf_adapter().import_hf

        replace_directory(output, lambda path: import_hf(args.source, path))  # the model and its tokenizer
        print(f"wrote {output}")
    return 0


def _from_reference(args: argparse.Namespace):
    from megalodon import MegalodonConfig
    from megalodon.checkpoint import non_finite_tensors, read_config
    from megalodon.convert import from_reference, read_reference_file

    if args.config is None:
        raise ValueError("from-reference needs --config: a config.json or a preset name (with --vocab-size)")
    overrides = {"vocab_size": args.vocab_size} if args.vocab_size else {}
    config = (read_config(args.config)[0] if Path(args.config).is_file()
              else MegalodonConfig.from_preset(args.config, **overrides))
    tensors = read_reference_file(args.source)
    bad = non_finite_tensors(tensors)
    if bad:
        raise ValueError(f"{args.source}: non-finite values (NaN or inf) in {', '.join(bad[:3])}; the checkpoint "
                         "diverged or is damaged: convert an earlier one")
    return from_reference(tensors, config), _reference_tokenizer(args.tokenizer, config.vocab_size)


def _reference_tokenizer(path: str | None, vocab_size: int):
    """The tokenizer to save beside imported weights (the reference's checkpoints come without one), or None."""
    if path is None:
        return None
    from megalodon.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(path)
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"--tokenizer {path} has {tokenizer.vocab_size:,} tokens but the model's embedding holds "
                         f"{vocab_size:,}: give the tokenizer the checkpoint was trained with")
    return tokenizer


def _write_reference(tensors: dict, path: Path, suffix: str, tied: bool) -> None:
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        if tied:  # safetensors refuses shared storage; import re-ties the two keys
            tensors = {**tensors, "output.output.weight": tensors["output.output.weight"].clone()}
        save_file(tensors, str(path))
    else:
        import torch

        torch.save(tensors, path)


def _hf_adapter():
    """megalodon.hf, or an error that names the install step (transformers is an optional extra)."""
    try:
        import megalodon.hf
    except ImportError as err:
        raise RuntimeError(str(err)) from None
    return megalodon.hf


def build_parser() -> argparse.ArgumentParser:
    from megalodon import __version__
    from megalodon.cli_options import SPELLING_NOTE, Parser, add_verbosity_options

    parser = Parser(prog="megalodon", description=f"{__doc__} {SPELLING_NOTE}")
    parser.add_argument("--version", action="version", version=f"megalodon-torch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    convert = sub.add_parser("convert", help="convert a model directory to or from the reference implementation's "
                                              "keyspace or the Hugging Face transformers layout")
    convert.add_argument("direction", choices=["from-reference", "to-reference", "to-hf", "from-hf", "consolidate"])
    convert.add_argument("source", help="reference .pth/.safetensors, a model directory, or an HF directory")
    convert.add_argument("output", help="model directory, .pth/.safetensors file, or HF directory")
    convert.add_argument("--config", help="config JSON or preset name describing the reference checkpoint")
    convert.add_argument("--vocab-size", type=int, help="vocab size when --config is a preset")
    convert.add_argument("--tokenizer", help="from-reference: a tokenizer.json, or a directory holding one, to save "
                                             "beside the weights (reference checkpoints come without one)")
    convert.add_argument("--overwrite", action="store_true",
                         help="replace an existing output (a model directory is replaced whole)")
    convert.set_defaults(run=_convert)

    from megalodon.inference.commands import add_eval_parser, add_generate_parser

    add_generate_parser(sub)
    add_eval_parser(sub)

    from megalodon.training.commands import add_parsers as add_training_parsers

    add_training_parsers(sub)
    from megalodon.tasks.commands import add_parser as add_tasks_parser

    add_tasks_parser(sub)
    for command in sub.choices.values():
        command.add_argument("--debug", action="store_true",
                             help="show the full traceback of an error (or set MEGALODON_DEBUG=1)")
        add_verbosity_options(command)
        command.epilog = SPELLING_NOTE
    parser.verbs = sub.choices
    return parser


def main(argv: list[str] | None = None) -> int:
    from megalodon.cli_options import command_logging, resolve_device, unknown_option_error

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv:  # what the command does, not just "the following arguments are required: command"
        parser.print_help(sys.stderr)
        return 2
    try:
        args, extra = parser.parse_known_args(argv)
        if extra and not getattr(args, "takes_overrides", False):
            verb = parser.verbs[args.command]
            verb.error(unknown_option_error(verb, extra, argv))
    except SystemExit as done:  # --help, --version, or a usage error that argparse has printed
        return done.code if isinstance(done.code, int) else 0
    debug = args.debug or os.environ.get("MEGALODON_DEBUG", "") not in ("", "0")
    prefix = f"megalodon {args.command}"
    try:
        with warnings.catch_warnings(), command_logging(args.verbose, args.quiet):
            warnings.showwarning = lambda message, *_: print(f"{prefix}: note: {message}", file=sys.stderr)
            if getattr(args, "device", None) is not None:
                args.device = resolve_device(args.device)
                check_device(args.device)
            return args.run(args, extra) if getattr(args, "takes_overrides", False) else args.run(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - every error becomes one line; --debug shows the traceback
        if debug:
            raise
        print(f"{prefix}: error: {describe_error(err, args.command)}", file=sys.stderr)
        return 2


def check_device(spec: str) -> None:
    """Refuse a --device this torch cannot use, before any work (torch would fail later, deep inside); make a
    cuda:N the current device."""
    import torch

    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"--device {spec!r} is not a torch device ({err}); use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise ValueError(f"--device {spec}: this PyTorch build has no CUDA support (a CPU-only wheel); use "
                             "--device cpu, or install a CUDA build of torch")
        if not torch.cuda.is_available():
            raise ValueError(f"--device {spec}: no CUDA GPU is visible to this process; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {spec}: there are only {torch.cuda.device_count()} CUDA device(s) "
                             f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
        if device.index is not None:
            # Everything that launches on the current device (Triton kernels, CUDA graphs, streams) then runs on
            # the one asked for, not on cuda:0.
            torch.cuda.set_device(device)
    elif device.type == "mps":  # Metal has no float64
        raise ValueError(f"--device {spec}: Apple's MPS has no float64, which the TimestepNorm's statistics and the "
                         "loss sums are kept in; use --device cpu")
    elif device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {spec}: unsupported device type {device.type!r}; use cpu or cuda")


_OS_HINTS = {
    errno.EACCES: "check the permissions, or choose another location",
    errno.EPERM: "check the permissions, or choose another location",
    errno.EROFS: "the file system is read-only; choose another location",
    errno.ENOSPC: "the disk is full; free some space or choose another location",
    errno.EDQUOT: "the disk quota is exceeded; free some space or choose another location",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
    errno.EISDIR: "a file was expected there, not a directory",
    errno.ENOENT: "no such file or directory",
}


def describe_error(err: Exception, command: str | None = None) -> str:
    """One line for the user: what went wrong, with which file or option, and what to do."""
    from safetensors import SafetensorError

    from megalodon.out_of_memory import COMMAND_FIXES, OutOfMemory, is_out_of_memory, torch_figures

    if is_out_of_memory(err) and not isinstance(err, OutOfMemory):  # not explained where it happened
        fixes = COMMAND_FIXES.get(command, "use a smaller model or batch, or another --device")
        return f"out of memory ({torch_figures(err)}): {fixes}"

    if isinstance(err, OSError) and err.filename is not None:
        names = " -> ".join(str(n) for n in (err.filename, err.filename2) if n is not None)
        reason, hint = err.strerror or str(err), _OS_HINTS.get(err.errno, "")
        return f"{names}: {reason}" + (f" ({hint})" if hint and hint != reason.lower() else "")
    if isinstance(err, OSError) and err.errno is not None and err.strerror:
        return err.strerror  # ours: the message names the file and the fix already
    if isinstance(err, (ValueError, OSError, TypeError, RuntimeError)):
        return str(err)
    if isinstance(err, SafetensorError):
        return (f"a safetensors file could not be read or written ({err}): it may be truncated or damaged, or "
                "the disk full")
    return (f"unexpected {type(err).__name__}: {err} (rerun with --debug, or MEGALODON_DEBUG=1, to see the "
            "traceback, and please report it)")


if __name__ == "__main__":
    sys.exit(main())

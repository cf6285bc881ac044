"""The `megalodon` command: one subcommand per job."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _convert(args: argparse.Namespace) -> int:
    import torch

    from megalodon import Megalodon, MegalodonConfig
    from megalodon.checkpoint import read_config
    from megalodon.convert import from_reference, read_reference_file, to_reference

    output = Path(args.output)
    if args.direction == "from-reference":
        if args.config is None:
            raise ValueError("from-reference needs --config: a config.json or a preset name (with --vocab-size)")
        overrides = {"vocab_size": args.vocab_size} if args.vocab_size else {}
        config = (read_config(args.config)[0] if Path(args.config).is_file()
                  else MegalodonConfig.from_preset(args.config, **overrides))
        model = from_reference(read_reference_file(args.source), config)
        model.save_pretrained(output)
        print(f"wrote {output} ({model.num_parameters():,} parameters)")
    elif args.direction == "to-reference":
        model = Megalodon.from_pretrained(args.source)
        tensors = to_reference(model)
        if output.suffix == ".safetensors":
            from safetensors.torch import save_file

            if model.config.share_emb:  # safetensors refuses shared storage; import re-ties the two keys
                tensors["output.output.weight"] = tensors["output.output.weight"].clone()
            save_file(tensors, str(output))
        else:
            torch.save(tensors, output)
        print(f"wrote {output} ({len(tensors)} reference keys)")
    elif args.direction == "to-hf":
        export_hf = _hf_adapter().export_hf

        tokenizer = args.source if (Path(args.source) / "tokenizer_config.json").is_file() else None
        export_hf(args.source, output, tokenizer=tokenizer)
        print(f"wrote {output} (transformers layout{', with tokenizer' if tokenizer else ''})")
    else:
        import_hf = _hf_adapter().import_hf

        import_hf(args.source, output)  # the model and its tokenizer
        print(f"wrote {output}")
    return 0


def _hf_adapter():
    """megalodon.hf, or an error that names the install step (transformers is an optional extra)."""
    try:
        import megalodon.hf
    except ImportError as err:
        raise RuntimeError(str(err)) from None
    return megalodon.hf


def build_parser() -> argparse.ArgumentParser:
    from megalodon import __version__

    parser = argparse.ArgumentParser(prog="megalodon", description=__doc__)
    parser.add_argument("--version", action="version", version=f"megalodon-torch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    convert = sub.add_parser("convert", help="convert a model directory to or from the reference implementation's "
                                              "keyspace or the Hugging Face transformers layout")
    convert.add_argument("direction", choices=["from-reference", "to-reference", "to-hf", "from-hf"])
    convert.add_argument("source", help="reference .pth/.safetensors, a model directory, or an HF directory")
    convert.add_argument("output", help="model directory, .pth/.safetensors file, or HF directory")
    convert.add_argument("--config", help="config JSON or preset name describing the reference checkpoint")
    convert.add_argument("--vocab-size", type=int, help="vocab size when --config is a preset")
    convert.set_defaults(run=_convert)

    from megalodon.inference.commands import add_eval_parser, add_generate_parser

    add_generate_parser(sub)
    add_eval_parser(sub)

    from megalodon.training.commands import add_parsers as add_training_parsers

    add_training_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "takes_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.run(args, extra) if getattr(args, "takes_overrides", False) else args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError, TypeError, RuntimeError) as err:
        print(f"megalodon {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

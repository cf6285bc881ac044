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

    if args.direction == "from-reference":
        if args.config is None:
            raise SystemExit("megalodon convert from-reference needs --config (a JSON file or a preset name)")
        config = (read_config(args.config)[0] if Path(args.config).is_file()
                  else MegalodonConfig.from_preset(args.config, **({"vocab_size": args.vocab_size}
                                                                  if args.vocab_size else {})))
        model = from_reference(read_reference_file(args.source), config)
        model.save_pretrained(args.output)
        print(f"wrote {args.output} ({model.num_parameters():,} parameters)")
    else:
        model = Megalodon.from_pretrained(args.source)
        tensors = to_reference(model)
        output = Path(args.output)
        if output.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in tensors.items() if k != "output.output.weight"
                       or not model.config.share_emb}, str(output))
        else:
            torch.save(tensors, output)
        print(f"wrote {output} ({len(tensors)} reference keys)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megalodon", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    convert = sub.add_parser("convert", help="convert to or from the reference implementation's keyspace")
    convert.add_argument("direction", choices=["from-reference", "to-reference"])
    convert.add_argument("source", help="reference .pth/.safetensors (from-reference) or a model directory")
    convert.add_argument("output", help="model directory (from-reference) or .pth/.safetensors file")
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

"""The conventions every verb of the `megalodon` command shares (issue 13, "One CLI convention")."""

import dataclasses
import json
import logging
import sys

import pytest
import torch

from megalodon.cli import build_parser, main
from megalodon.cli_options import field_docs, kebab_args, resolve_device
from megalodon import Megalodon
from megalodon.config import MegalodonConfig
from helpers import save_byte_model
from megalodon.progress import LogProgress, progress_bar
from megalodon.training.config import TrainConfig


@pytest.fixture
def model_dir(tmp_path):
    return save_byte_model(tmp_path / "model")


def verbs():
    return build_parser().verbs


def long_options(parser):
    return [s for action in parser._actions for s in action.option_strings if s.startswith("--")]


def test_every_option_of_every_verb_is_declared_in_kebab_case():
    """The parser rewrites --snake_case to --kebab-case, so a declared --snake_case option could never match."""
    for name, parser in verbs().items():
        for option in long_options(parser):
            assert "_" not in option, f"megalodon {name} declares {option}"


def test_option_names_are_rewritten_and_values_are_not():
    args = ["--max_new_tokens", "5", "--stop=a_b", "--model.chunk_size=4", "-o", "gap_x=1", "--", "--keep_me"]
    assert kebab_args(args) == ["--max-new-tokens", "5", "--stop=a_b", "--model.chunk-size=4", "-o", "gap_x=1",
                                "--", "--keep_me"]


@pytest.mark.parametrize("spelling", ["snake", "kebab"])
def test_each_verb_takes_both_spellings(model_dir, tmp_path, capsys, spelling):
    def opt(name):
        return "--" + (name.replace("-", "_") if spelling == "snake" else name)

    assert main(["generate", str(model_dir), "--prompt", "ab", opt("max-new-tokens"), "3", opt("top-k"), "5",
                 "--seed", "1"]) == 0
    assert "[3 tokens" in capsys.readouterr().err
    assert main(["train", "--quick", opt("run-dir"), str(tmp_path / "r"), opt("seq-len"), "64",
                 opt("model.chunk-size"), "16", opt("print-config")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["seq_len"] == 64 and printed["model"] == {"chunk_size": 16}
    assert not (tmp_path / "r").exists()  # --print_config trains nothing
    doc = tmp_path / "doc.txt"
    doc.write_text("a few words to score " * 4)
    assert main(["eval", str(model_dir), "--files", str(doc), "--out", str(tmp_path / "eval"), opt("max-docs"), "1",
                 opt("block-size"), "16", opt("bucket-edges"), "0,8"]) == 0
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())["results"][0]
    assert result["settings"]["block_size"] == 16 and result["loss_by_position"][0]["end"] == 8
    assert main(["tasks", "recall", "--show", opt("task-option"), "gap=3", "--examples", "1"]) == 0
    assert "'gap': 3" in capsys.readouterr().out
    preset_model = tmp_path / "preset-model"  # the tiny preset at a vocab it does not have by default
    Megalodon(MegalodonConfig.from_preset("tiny", vocab_size=300)).save_pretrained(preset_model)
    assert main(["convert", "to-reference", str(preset_model), str(tmp_path / "ref.pth")]) == 0
    assert main(["convert", "from-reference", str(tmp_path / "ref.pth"), str(tmp_path / "back"), "--config", "tiny",
                 opt("vocab-size"), "300"]) == 0
    assert json.loads((tmp_path / "back" / "config.json").read_text())["vocab_size"] == 300


@pytest.mark.parametrize("argv, message", [
    (["generate", "M", "--prompt", "x", "--max_new_tokns", "3"], "unknown option 'max_new_tokns' (did you mean "
                                                                  "'max_new_tokens'?)"),
    (["generate", "M", "--prompt", "x", "--max-new-tokns", "3"], "did you mean 'max-new-tokens'?"),
    (["train", "--quick", "--max_stesp", "3"], "did you mean 'max_steps'?"),
    (["train", "--quick", "--model.chunk_sise", "3"], "did you mean 'model.chunk_size'?"),
    (["eval", "M", "--files", "x", "--out", "o", "--windw", "3"], "did you mean 'window'?"),
    (["convert", "to-hf", "a", "b", "--overwrit"], "did you mean 'overwrite'?"),
    (["generate", "--model", "M", "--prompt", "x"], "unknown option 'model': model_dir is positional, given without "
                                                    "a dash (megalodon generate MODEL_DIR ...)"),
    (["generate", "--model_dir", "M", "--prompt", "x"], "model_dir is positional"),
    (["convert", "to-hf", "--model", "a", "b"], "unknown option 'model' (see megalodon convert --help)"),
])
def test_a_misspelled_option_gets_the_closest_name(model_dir, capsys, argv, message):
    argv = [str(model_dir) if a == "M" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_no_subcommand_prints_what_each_one_does(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "usage: megalodon" in err and "train a model" in err and "generate text" in err


def test_train_help_lists_every_field_with_type_default_and_help(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    text, squeezed = " ".join(out.split()), "".join(out.split())  # argparse wraps lines (and breaks at hyphens)
    train_help, _ = field_docs(TrainConfig)
    model_help, _ = field_docs(MegalodonConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name == "model":
            continue
        assert train_help[f.name], f"TrainConfig.{f.name} has no help comment"
        option = "--" + f.name.replace("_", "-")
        assert f"{option} " in text and f"default: {f.default!r}" in text, option
        assert "".join(train_help[f.name].split()) in squeezed
    for f in dataclasses.fields(MegalodonConfig):
        assert model_help[f.name], f"MegalodonConfig.{f.name} has no help comment"
        assert "--model." + f.name.replace("_", "-") in text
    assert "--seq-len INT" in text and "--lr FLOAT" in text and "--compile [BOOL]" in text
    assert "--model.rope-base FLOAT|none" in text and "training: optimization (reference defaults):" in text


def test_field_docs_reads_inline_comments_and_sections():
    @dataclasses.dataclass
    class Example:
        # first part
        a: int = 1  # the a
        b: str = "x"  # the b, with a "quote" # and a hash
        # second part
        c: dict = dataclasses.field(
            default_factory=dict)  # spans lines
        d: float = 0.5
        e: int = dataclasses.field(default=0, metadata={"help": "from metadata"})  # not this

    helps, sections = field_docs(Example)
    assert helps == {"a": "the a", "b": 'the b, with a "quote" # and a hash', "c": "spans lines", "d": "",
                     "e": "from metadata"}
    assert sections == {"a": "first part", "b": "first part", "c": "second part", "d": "second part",
                        "e": "second part"}


def test_generate_help_shows_defaults(capsys):
    assert main(["generate", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for needle in ("--max-new-tokens N tokens to generate per prompt (default: 128)", "(default: 1.0)",
                   "--top-k K", "(default: auto)", "snake_case or --kebab-case"):
        assert needle in text, needle


def test_print_config_resolves_file_quick_and_flags_in_order(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text('preset = "tiny"\nlr = 0.5\nseq_len = 512\n[model]\nchunk_size = 64\nnum_layers = 1\n')
    assert main(["train", "--config", str(config), "--quick", "--seq_len", "256", "--model.chunk_size", "32",
                 "--compile", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["lr"] == 3e-3 and printed["seq_len"] == 256 and printed["compile"] is True  # quick, then flags
    assert printed["model"] == {"chunk_size": 32, "num_layers": 1} and printed["eval_tokens"] == 4096
    assert TrainConfig.from_dict(printed).to_dict() == printed  # a valid --config file as it is


def test_bad_values_are_named_by_option(capsys):
    assert main(["train", "--quick", "--lr", "fast"]) == 2
    assert "--lr expects a number (float), got 'fast'" in capsys.readouterr().err
    assert main(["train", "--quick", "--compile", "maybe", "--print-config"]) == 2
    assert "expects true or false" in capsys.readouterr().err
    assert main(["train", "--quick", "--schedule", "steep", "--print-config"]) == 2
    assert "schedule must be one of" in capsys.readouterr().err


def test_device_defaults_to_auto_everywhere(monkeypatch):
    for name, parser in verbs().items():
        devices = [a for a in parser._actions if "--device" in a.option_strings]
        assert name == "convert" or [a.default for a in devices] == ["auto"], name
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda" and resolve_device("cpu") == "cpu"


def test_the_command_configures_logging_and_quiet_silences_info(model_dir, capsys, monkeypatch):
    def run(args):
        logging.getLogger("megalodon.inference").info("an info line")
        logging.getLogger("megalodon.inference").warning("a warning line")
        return 0

    parser = build_parser()
    monkeypatch.setattr("megalodon.cli.build_parser", lambda: parser)
    parser.verbs["generate"].set_defaults(run=run)
    assert main(["generate", str(model_dir), "--prompt", "x"]) == 0
    err = capsys.readouterr().err
    assert "an info line\n" in err and "warning: a warning line" in err
    assert main(["generate", str(model_dir), "--prompt", "x", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "an info line" not in err and "warning: a warning line" in err
    assert not logging.getLogger("megalodon").handlers  # the command leaves no handler behind


def test_progress_in_a_log_is_plain_periodic_lines(monkeypatch, caplog):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    clock = iter(range(1000))
    monkeypatch.setattr("megalodon.progress.time.perf_counter", lambda: float(next(clock)))
    with caplog.at_level("INFO", logger="megalodon"):
        bar = progress_bar(total=100, desc="train", interval=10.0)
        assert isinstance(bar, LogProgress)
        for _ in range(100):  # one clock second per step
            bar.update(1)
            bar.set_postfix(loss="1.0")
        bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert 8 <= len(lines) <= 11 and all("\r" not in line for line in lines)  # every ~10 steps, not every step
    assert lines[-1].startswith("train: 100/100 (100%), loss=1.0")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    bar = progress_bar(total=3, desc="train", disable=False)
    assert not isinstance(bar, LogProgress)  # a terminal gets the tqdm bar
    bar.close()

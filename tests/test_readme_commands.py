"""Every command in README.md and src/megalodon/hf/README.md runs as written (issue 13, "Done means").

The commands are read from the fenced ```bash and ```python blocks, in document order, and run in one fresh
directory, so that each README's later commands find what its earlier ones made (runs/demo/model, runs/demo/hf).
Inline code spans are fragments, not commands; an unlabelled block must hold no command (checked).

What the test changes, and why, is in PLAN below and nowhere else:
- runs that take minutes get tiny settings appended (a later option wins): the tiny preset, the byte tokenizer,
  2 steps;
- the data is made up front: a stand-in Shakespeare and Austen cache under data/corpora/ (the real ones are a
  download and a Debian package), the user's own files that the README names (my_texts/, extra.jsonl, book.txt,
  evals/*.jsonl);
- commands that install packages or run this test suite are skipped, with the reason.
Each python block runs where it stands, in one interpreter per README (as in a notebook: later blocks use the
names that earlier ones define).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
READMES = [ROOT / "README.md", ROOT / "src" / "megalodon" / "hf" / "README.md"]
TINY = ("--preset tiny --tokenizer byte --seq_len 64 --batch_size 2 --max_steps 2 --time_budget_min 0 "
        "--eval_every 0 --eval_tokens 256 --sample_tokens 8 --checkpoint_every 0")
DEMO_RECIPE = "megalodon train --config demo --run-dir runs/demo --overwrite"  # the Makefile's `demo` target

# command (as in the README, comment dropped) -> ("append", args, why) | ("replace", command, why) | ("skip", why)
PLAN = {
    "make demo": ("replace", f"{DEMO_RECIPE} {TINY}",
                  "the Makefile's demo recipe (checked below) with tiny settings; `make` would build a virtualenv"),
    "make test": ("skip", "runs the test suite that this test belongs to"),
    "megalodon train --config demo": ("skip", "`make demo`'s recipe, run above with tiny settings, is this command "
                                              "with a run directory of its own"),
    "megalodon train --preset base --data austen --seq_len 4096 --batch_size 4 --max_steps 2000 --run-dir runs/base":
        ("append", TINY, "2000 steps of the base preset; the Austen cache is a stand-in"),
    "megalodon train --data my_texts/,extra.jsonl --tokenizer bpe --vocab_size 16000 --time_budget_min 60 "
    "--run-dir runs/mine": ("append", "--vocab_size 300 --preset tiny --seq_len 64 --batch_size 2 --max_steps 2 "
                                      "--time_budget_min 0 --eval_tokens 256 --sample_tokens 8",
                            "an hour of training; a 16000-token BPE needs more text than the stand-in"),
    "megalodon train --arch llama --config demo": ("append", TINY, "five minutes of training"),
    "megalodon train --init_from runs/demo/model --data my_texts/ --lr 3e-4 --max_steps 500 --run-dir runs/tuned":
        ("append", "--seq_len 64 --batch_size 2 --max_steps 2 --eval_every 0 --eval_tokens 256 --sample_tokens 8 "
                   "--checkpoint_every 0", "500 steps; the model and tokenizer are the tiny demo run's"),
    "megalodon compare --config demo --max_steps 300 --run-dir runs/compare": ("append", TINY, "300 steps, twice"),
    'pip install -e ".[hf]"': ("skip", "installs packages; the test runs in that installation"),
    'pip install -e ".[eval]"': ("skip", "installs packages; the test runs in that installation"),
}


def commands(readme: Path) -> list[tuple[str, str]]:
    """(kind, text) in document order: ("bash", one command, continuation lines joined) or ("python", a block)."""
    found = []
    for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", readme.read_text(), flags=re.M | re.S):
        if lang == "python":
            found.append(("python", body))
        elif lang in ("bash", "sh"):
            for line in body.replace("\\\n", " ").splitlines():
                line = re.sub(r"\s+#\s.*$", "", line).strip()
                if line and not line.startswith("#"):
                    found.append(("bash", " ".join(line.split()) if "$'" not in line else line))
        else:
            starts = ("megalodon ", "make ", "pip ", "python ", "lm_eval ")
            assert not any(line.strip().startswith(starts) for line in body.splitlines()), \
                f"{readme.name}: a command in an unlabelled ``` block; mark it ```bash so that this test runs it"
    return found


def make_workspace(root: Path) -> None:
    """The data the README's commands read: stand-in corpora, and the files the README asks the user to bring."""
    line = "Enter a player, who speaks of crowns and candles, and of the night that will not end. "
    for i in range(40):
        play = root / "data" / "corpora" / "shakespeare" / f"play{i:02d}_gut.txt"
        play.parent.mkdir(parents=True, exist_ok=True)
        play.write_text(f"ACT {i}.\n" + (f"KING {i}: " + line + "\n") * (8 + i % 5))
    for name in ("emma", "persuasion", "prideprejudice", "sensesensibility"):
        novel = root / "data" / "corpora" / "austen" / f"{name}.txt"
        novel.parent.mkdir(parents=True, exist_ok=True)
        novel.write_text(("It is a truth universally acknowledged, said " + name + ".\n") * 60)
    (root / "my_texts").mkdir()
    for i in range(4):
        (root / "my_texts" / f"note{i}.txt").write_text(("my own words, page %d, " % i + line + "\n") * 20)
    (root / "extra.jsonl").write_text("".join(json.dumps({"text": line * (3 + i)}) + "\n" for i in range(6)))
    (root / "book.txt").write_text(line * 30)
    (root / "evals").mkdir()
    (root / "evals" / "austen.jsonl").write_text("".join(json.dumps({"text": line * 2}) + "\n" for _ in range(2)))
    (root / "evals" / "mc.jsonl").write_text("".join(
        json.dumps({"question": "Who speaks?", "choices": ["a king", "a fox"], "answer": 0}) + "\n"
        for _ in range(2)))


def environment(root: Path) -> dict:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(root / ".hf"), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("TRITON_INTERPRET", None)
    return env


def run(command: list[str], root: Path, label: str) -> None:
    result = subprocess.run(command, cwd=root, env=environment(root), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, \
        f"{label}\nexit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


# Runs blocks sent as JSON lines in one namespace; answers each with one JSON line on the real stdout (the blocks'
# own prints go to stderr).
NOTEBOOK = """
import contextlib, json, sys, traceback
answers, namespace = sys.stdout, {"__name__": "__main__"}
for line in sys.stdin:
    try:
        with contextlib.redirect_stdout(sys.stderr):
            exec(compile(json.loads(line), "<readme block>", "exec"), namespace)
        answers.write(json.dumps(None) + "\\n")
    except BaseException:
        answers.write(json.dumps(traceback.format_exc()) + "\\n")
    answers.flush()
"""


class Notebook:
    """One Python process that runs a README's python blocks in order, keeping their names."""

    def __init__(self, root: Path):
        self.process = subprocess.Popen([sys.executable, "-c", NOTEBOOK], cwd=root, env=environment(root), text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)

    def run(self, block: str, label: str) -> None:
        self.process.stdin.write(json.dumps(block) + "\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline()
        assert answer, f"{label}: the interpreter died"
        error = json.loads(answer)
        assert error is None, f"{label}\n{error}"

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def test_the_plan_names_only_commands_that_exist():
    """A README edit that drops or rewords a command must update PLAN, or the plan would silently go stale."""
    written = {text for readme in READMES for kind, text in commands(readme) if kind == "bash"}
    assert set(PLAN) <= written, set(PLAN) - written
    makefile = (ROOT / "Makefile").read_text()
    assert f"$(VENV)/bin/{DEMO_RECIPE}\n" in makefile  # `make demo` is replaced by exactly its recipe


@pytest.mark.slow
def test_every_readme_command_runs(tmp_path):
    if shutil.which("bash") is None:
        pytest.skip("needs bash")
    make_workspace(tmp_path)
    ran, skipped = [], []
    for readme in READMES:
        name = str(readme.relative_to(ROOT))
        notebook = Notebook(tmp_path)
        try:
            for kind, text in commands(readme):
                if kind == "python":
                    notebook.run(text, f"{name}: python block\n{text}")
                    ran.append(f"{name}: python block {text.splitlines()[0]}")
                    continue
                action, *detail = PLAN.get(text, ("run",))
                if action == "skip":
                    skipped.append((text, detail[0]))
                    continue
                if text.startswith("HF_HUB_OFFLINE") and shutil.which(
                        "lm_eval", path=environment(tmp_path)["PATH"]) is None:
                    skipped.append((text, "lm-eval is not installed (pip install -e '.[eval]')"))
                    continue
                command = {"run": text, "append": f"{text} {detail[0] if detail else ''}",
                           "replace": detail[0] if detail else text}[action]
                run(["bash", "-c", command], tmp_path, f"{name}: {text}\n(ran: {command})")
                ran.append(text)
        finally:
            notebook.close()
    print(f"ran {len(ran)}:", *ran, "skipped:", *(f"{text}: {why}" for text, why in skipped), sep="\n  ")
    assert len(ran) >= 20 and (tmp_path / "runs" / "demo" / "hf" / "modeling_megalodon.py").is_file()

"""An export loads with trust_remote_code=True where megalodon cannot be imported, and computes what the package does.

The child process removes every sys.path entry that holds a `megalodon` package and installs an import hook that
refuses the name, so any `import megalodon` in the generated code (or in transformers' handling of it) fails.
"""

import pytest

pytest.importorskip("transformers")

import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from megalodon.data import ByteTokenizer  # noqa: E402
from megalodon.hf import MegalodonForCausalLM, export_hf  # noqa: E402
from megalodon.hf.remote_code import AUTO_MAP  # noqa: E402

CODE_FILES = ("configuration_megalodon.py", "modeling_megalodon.py")

CHILD = textwrap.dedent('''
    import importlib.abc, os, sys
    from pathlib import Path

    class NoMegalodon(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "megalodon" or name.startswith("megalodon."):
                raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)")

    sys.path = [p for p in sys.path if not (Path(p or ".") / "megalodon").exists()]
    sys.meta_path.insert(0, NoMegalodon())
    try:
        import megalodon
        raise SystemExit("megalodon is still importable")
    except ModuleNotFoundError:
        pass

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.set_num_threads(1)
    export, out = Path(sys.argv[1]), Path(sys.argv[2])
    model = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(export, trust_remote_code=True)
    inputs = torch.load(out / "inputs.pt")
    with torch.no_grad():
        logits = model(inputs["ids"]).logits
    batch = tokenizer(inputs["prompts"], return_tensors="pt", padding=True)
    greedy = model.generate(**batch, max_new_tokens=12, do_sample=False)
    torch.manual_seed(5)
    sampled = model.generate(**batch, max_new_tokens=12, do_sample=True, top_k=20)
    model.save_pretrained(out / "resaved")
    tokenizer.save_pretrained(out / "resaved")
    reloaded = AutoModelForCausalLM.from_pretrained(out / "resaved", trust_remote_code=True)
    with torch.no_grad():
        relogits = reloaded(inputs["ids"]).logits
    leaked = sorted(name for name in sys.modules if name.split(".")[0] == "megalodon")
    torch.save({"logits": logits, "relogits": relogits, "greedy": greedy, "sampled": sampled, "leaked": leaked,
                "module": type(model).__module__}, out / "child.pt")
''')


@pytest.fixture
def export(core, tmp_path):
    return export_hf(core, tmp_path / "export", tokenizer=ByteTokenizer())


def _package_outputs(export, inputs):
    model = AutoModelForCausalLM.from_pretrained(export)  # the package's classes (megalodon.hf is imported)
    assert type(model) is MegalodonForCausalLM
    tokenizer = AutoTokenizer.from_pretrained(export)
    with torch.no_grad():
        logits = model(inputs["ids"]).logits
    batch = tokenizer(inputs["prompts"], return_tensors="pt", padding=True)
    greedy = model.generate(**batch, max_new_tokens=12, do_sample=False)
    torch.manual_seed(5)
    sampled = model.generate(**batch, max_new_tokens=12, do_sample=True, top_k=20)
    return logits, greedy, sampled


@pytest.mark.slow
def test_the_export_runs_without_megalodon_and_matches_the_package(export, tmp_path):
    inputs = {"ids": torch.randint(0, 256, (2, 29), generator=torch.Generator().manual_seed(0)),
              "prompts": ["To be, or not", "Once"]}
    work = tmp_path / "child"
    work.mkdir()
    torch.save(inputs, work / "inputs.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf_home"), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", CHILD, str(export), str(work)], cwd=work, env=env,
                         capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "custom code" not in run.stderr and "instantiate a model of type" not in run.stderr  # no prompt, no warning
    child = torch.load(work / "child.pt")
    assert child["leaked"] == [] and child["module"].startswith("transformers_modules.")

    logits, greedy, sampled = _package_outputs(export, inputs)
    assert torch.equal(child["logits"], logits)
    assert torch.equal(child["relogits"], logits)
    assert torch.equal(child["greedy"], greedy) and torch.equal(child["sampled"], sampled)

    # Saving the remote-code model writes the same two code files and an auto_map that names only them.
    resaved = work / "resaved"
    assert sorted(p.name for p in resaved.glob("*.py")) == sorted(CODE_FILES)
    assert json.loads((resaved / "config.json").read_text())["auto_map"] == AUTO_MAP
    for name in CODE_FILES:
        assert (resaved / name).read_text() == (export / name).read_text()


def test_an_export_holds_the_code_files_and_a_model_card(export):
    assert {p.name for p in export.iterdir()} >= {"config.json", "model.safetensors", "README.md", "tokenizer.json",
                                                 *CODE_FILES}
    assert json.loads((export / "config.json").read_text())["auto_map"] == AUTO_MAP
    card = (export / "README.md").read_text()
    front = card.split("---\n")[1]
    assert "library_name: transformers\n" in front and "pipeline_tag: text-generation\n" in front
    assert "| `chunk_size` | `8` |" in card and "trust_remote_code=True" in card
    assert "## Training" not in card  # an in-memory model has no training record


def test_the_model_card_carries_the_training_summary_of_a_run(core, tmp_path):
    run = tmp_path / "run"
    core.save_pretrained(run / "model")
    ByteTokenizer().save(run / "model")
    (run / "summary.json").write_text(json.dumps({"steps": 40, "tokens": 20480, "val_loss": 2.5, "val_bpb": 3.6}))
    (run / "train_config.json").write_text(json.dumps({"data": "shakespeare", "seq_len": 128}))
    export_hf(run / "model", tmp_path / "hf", tokenizer=run / "model")
    card = (tmp_path / "hf" / "README.md").read_text()
    for row in ("| data | `shakespeare` |", "| sequence length | `128` |", "| optimizer steps | 40 |",
                "| training tokens | 20,480 |", "| validation bits/byte | 3.6000 |"):
        assert row in card


def test_re_exporting_removes_the_old_loader_module(core, tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "megalodon_hf.py").write_text("from megalodon.hf import MegalodonForCausalLM\n")
    export_hf(core, tmp_path / "hf")
    assert not (tmp_path / "hf" / "megalodon_hf.py").exists()


def test_auto_tokenizer_does_not_prompt_once_megalodon_hf_is_imported(export, monkeypatch):
    def no_prompt(*args):
        raise AssertionError("AutoTokenizer asked whether to run custom code")

    monkeypatch.setattr("builtins.input", no_prompt)
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert tokenizer.encode("hi", add_special_tokens=False) == [104, 105]

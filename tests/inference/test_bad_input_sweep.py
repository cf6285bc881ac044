"""A sweep of bad inputs and faults through `megalodon generate | eval | convert` and through the Python API of
model directories, sessions, streaming and evaluation (issue 12's review, redone after the fixes).

Every case must end in one clear error that names the problem: exit code 2 and one `error:` line on stderr
(argparse's own usage errors count too), or a ValueError / TypeError / OSError from the API. A traceback or a
raw library error is a failure, and so is silent acceptance. The workspace and the classification are in
sweep_support.py.

For the tally, run it as a script: `.venv/bin/python tests/inference/test_bad_input_sweep.py`.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Callable
from unittest import mock

import pytest
import torch
from safetensors import SafetensorError

sys.path.insert(0, str(Path(__file__).parent))  # as a script, too
from sweep_support import (  # noqa: E402
    Case, Workspace, edit_config, flip_last_byte, full_disk, make_model, nan_weights, read_only, run_case,
)

from megalodon.checkpoint import load_pretrained, save_pretrained  # noqa: E402
from megalodon.data import ByteTokenizer  # noqa: E402
from megalodon.inference import EvalDocument, SamplingConfig, evaluate, generate  # noqa: E402
from megalodon.inference.session import load_session, save_session  # noqa: E402
from megalodon.inference.stream import RecencyWindow, final_logits_and_state, stream_blocks  # noqa: E402


def generate_case(name, extra, needle, model=None, **kw) -> Case:
    return Case(f"generate: {name}", lambda ws: ["generate", str(model(ws) if model else ws.model), *extra(ws)],
                needle, **kw)


def _prompt(ws):
    return ["--prompt", "hi", "--max-new-tokens", "2"]


def _session_over(ws, name):
    """A session written into a copy of the model directory (should it be accepted, the copy is lost)."""
    directory = ws.copy()
    return ["generate", str(directory), *_prompt(ws), "--session-out", str(directory / name)]


CLI_CASES = [
    # ---- the model directory
    generate_case("missing model directory", _prompt, "no model directory", lambda ws: ws.root / "nope"),
    generate_case("model path is a file", _prompt, "no model directory", lambda ws: ws.text),
    generate_case("no config.json", _prompt, "config.json",
                  lambda ws: ws.damaged_model(lambda d: (d / "config.json").unlink())),
    generate_case("config.json not JSON", _prompt, "not valid JSON",
                  lambda ws: ws.damaged_model(lambda d: ((d / "config.json").write_text("{oops"),
                                                         (d / "checksums.json").unlink(missing_ok=True)))),
    generate_case("config.json a list", _prompt, "config.json",
                  lambda ws: ws.damaged_model(lambda d: ((d / "config.json").write_text("[1, 2]"),
                                                         (d / "checksums.json").unlink(missing_ok=True)))),
    generate_case("config.json unknown field", _prompt, "colour",
                  lambda ws: ws.damaged_model(edit_config(colour="blue"))),
    generate_case("config.json negative layers", _prompt, "num_layers",
                  lambda ws: ws.damaged_model(edit_config(num_layers=-1))),
    generate_case("config.json layers as text", _prompt, "num_layers",
                  lambda ws: ws.damaged_model(edit_config(num_layers="two"))),
    generate_case("config.json unknown architecture", _prompt, "architecture",
                  lambda ws: ws.damaged_model(edit_config(architecture="gpt"))),
    generate_case("config.json shapes disagree with weights", _prompt, "shape",
                  lambda ws: ws.damaged_model(edit_config(ffn_hidden_dim=64))),
    generate_case("no weights", _prompt, "no weights",
                  lambda ws: ws.damaged_model(lambda d: (d / "model.safetensors").unlink())),
    generate_case("weights truncated", _prompt, "does not match",
                  lambda ws: ws.damaged_model(lambda d: (d / "model.safetensors").write_bytes(
                      (d / "model.safetensors").read_bytes()[:-64]))),
    generate_case("weights with flipped bytes", _prompt, "does not match",
                  lambda ws: ws.damaged_model(lambda d: flip_last_byte(d / "model.safetensors"))),
    generate_case("weights garbage, no checksums", _prompt, "not a readable safetensors",
                  lambda ws: ws.damaged_model(lambda d: ((d / "model.safetensors").write_bytes(os.urandom(500)),
                                                         (d / "checksums.json").unlink(missing_ok=True)))),
    generate_case("weights NaN", _prompt, "non-finite", lambda ws: ws.damaged_model(nan_weights)),
    generate_case("checksums.json garbage", _prompt, "checksums.json",
                  lambda ws: ws.damaged_model(lambda d: (d / "checksums.json").write_text("{["))),
    generate_case("checksums.json without files", _prompt, "checksums.json",
                  lambda ws: ws.damaged_model(lambda d: (d / "checksums.json").write_text('{"format": 1}'))),
    generate_case("checksums.json entries wrong", _prompt, "checksums.json",
                  lambda ws: ws.damaged_model(lambda d: (d / "checksums.json").write_text(
                      '{"files": {"model.safetensors": "x"}}'))),
    generate_case("no tokenizer", _prompt, "tokenizer",
                  lambda ws: ws.damaged_model(lambda d: (d / "tokenizer_config.json").unlink())),
    generate_case("tokenizer_config.json garbage", _prompt, "tokenizer_config.json",
                  lambda ws: ws.damaged_model(lambda d: (d / "tokenizer_config.json").write_text("{["))),
    generate_case("tokenizer.json garbage", _prompt, "tokenizer.json",
                  lambda ws: ws.damaged_model(lambda d: ((d / "tokenizer_config.json").unlink(),
                                                         (d / "tokenizer.json").write_text("{}")))),
    generate_case("a Llama directory", _prompt, "Megalodon", lambda ws: ws.llama),
    # ---- options
    generate_case("empty prompt", lambda ws: ["--prompt", ""], "empty"),
    generate_case("no prompt", lambda ws: [], "give a prompt"),
    generate_case("max-new-tokens 0", lambda ws: ["--prompt", "x", "--max-new-tokens", "0"], "max_new_tokens"),
    generate_case("max-new-tokens negative", lambda ws: ["--prompt", "x", "--max-new-tokens", "-3"],
                  "max_new_tokens"),
    generate_case("max-new-tokens not a number", lambda ws: ["--prompt", "x", "--max-new-tokens", "many"],
                  "--max-new-tokens"),
    generate_case("temperature negative", lambda ws: ["--prompt", "x", "--temperature", "-1"], "temperature"),
    generate_case("temperature nan", lambda ws: ["--prompt", "x", "--temperature", "nan"], "temperature"),
    generate_case("temperature inf", lambda ws: ["--prompt", "x", "--temperature", "inf"], "temperature"),
    generate_case("top-k negative", lambda ws: ["--prompt", "x", "--top-k", "-5"], "top_k"),
    generate_case("top-p 0", lambda ws: ["--prompt", "x", "--top-p", "0"], "top_p"),
    generate_case("top-p above 1", lambda ws: ["--prompt", "x", "--top-p", "1.5"], "top_p"),
    generate_case("repetition-penalty 0", lambda ws: ["--prompt", "x", "--repetition-penalty", "0"],
                  "repetition_penalty"),
    generate_case("repetition-penalty nan", lambda ws: ["--prompt", "x", "--repetition-penalty", "nan"],
                  "repetition_penalty"),
    generate_case("empty stop string", lambda ws: ["--prompt", "x", "--stop", ""], "stop"),
    generate_case("seed negative", lambda ws: ["--prompt", "x", "--seed", "-1"], "seed"),
    generate_case("truncate-chunks 2", lambda ws: ["--prompt", "x", "--truncate-chunks", "2"], "truncate_chunks"),
    generate_case("truncate-chunks negative", lambda ws: ["--prompt", "x", "--truncate-chunks", "-8"],
                  "truncate_chunks"),
    generate_case("threads negative", lambda ws: ["--prompt", "x", "--threads", "-1"], "--threads"),
    generate_case("device cuda on a CPU-only torch", lambda ws: ["--prompt", "x", "--device", "cuda"], "--device"),
    generate_case("device nonsense", lambda ws: ["--prompt", "x", "--device", "gpu"], "--device"),
    generate_case("device cuda:7", lambda ws: ["--prompt", "x", "--device", "cuda:7"], "--device"),
    generate_case("unknown option", lambda ws: ["--prompt", "x", "--temprature", "1"], "did you mean 'temperature'"),
    # ---- prompt files
    generate_case("prompt file missing", lambda ws: ["--prompt-file", str(ws.root / "nope.txt")], "no file"),
    generate_case("prompt file a directory", lambda ws: ["--prompt-file", str(ws.root)], "directory"),
    generate_case("prompt file not UTF-8", lambda ws: ["--prompt-file", str(ws.file("l1.txt", b"caf\xe9"))],
                  "UTF-8"),
    generate_case("prompt file empty", lambda ws: ["--prompt-file", str(ws.file("empty.txt", ""))], "empty"),
    # ---- sessions
    generate_case("session-in missing", lambda ws: ["--session-in", str(ws.root / "nope")], "no state file"),
    generate_case("session-in garbage", lambda ws: ["--session-in", str(ws.file("junk", os.urandom(200)))],
                  "not a readable"),
    generate_case("session-in a model's weights", lambda ws: ["--session-in", str(ws.model / "model.safetensors")],
                  "not a Megalodon state"),
    generate_case("session-in a directory", lambda ws: ["--session-in", str(ws.root)], "no state file"),
    generate_case("session-in damaged", lambda ws: ["--session-in", str(ws.damaged_session())], "damaged"),
    generate_case("session-in truncated", lambda ws: ["--session-in", str(ws.truncated_session())],
                  "not a readable"),
    generate_case("session-in from another model", lambda ws: ["--session-in", str(ws.session)],
                  "different model", lambda ws: ws.other),
    Case("generate: session-out over the model's weights", lambda ws: _session_over(ws, "model.safetensors"),
         "not a session"),
    Case("generate: session-out over config.json", lambda ws: _session_over(ws, "config.json"), "not a session"),
    generate_case("session-out over a text file", lambda ws: [*_prompt(ws), "--session-out", str(ws.copy(ws.text))],
                  "not a session"),
    generate_case("session-out a directory", lambda ws: [*_prompt(ws), "--session-out", str(ws.root)],
                  "directory"),
    generate_case("session-out under a file", lambda ws: [*_prompt(ws), "--session-out", str(ws.text / "s")],
                  "not a directory"),
    generate_case("session-out on a full disk", lambda ws: [*_prompt(ws), "--session-out", str(ws.root / "s1")],
                  "No space left", patches={"megalodon.files.os.fsync": full_disk}),
    generate_case("session-out read-only", lambda ws: [*_prompt(ws), "--session-out", str(ws.root / "s2")],
                  "--session-out", patches={"megalodon.files.tempfile.mkstemp": read_only}),
    generate_case("session write fails (disk full mid-write)",
                  lambda ws: [*_prompt(ws), "--session-out", str(ws.root / "s3")], "disk full",
                  patches={"megalodon.state.save_file": mock.Mock(side_effect=SafetensorError("No space left"))}),
    generate_case("two prompts with a session", lambda ws: ["--prompt", "a", "--prompt", "b", "--session-out",
                                                            str(ws.root / "s4")], "one conversation"),
    generate_case("prefill-only without session-out", lambda ws: ["--prompt", "a", "--prefill-only"],
                  "--session-out"),
    # ---- eval
    Case("eval: out is a file", lambda ws: ["eval", str(ws.model), "--files", str(ws.text), "--out", str(ws.text)],
         "not a directory"),
    Case("eval: out on a full disk", lambda ws: ["eval", str(ws.model), "--files", str(ws.text), "--out",
                                                 str(ws.root / "o1")], "No space left",
         patches={"megalodon.files.os.fsync": full_disk}),
    Case("eval: out read-only", lambda ws: ["eval", str(ws.model), "--files", str(ws.text), "--out",
                                            str(ws.root / "o2")], "--out",
         patches={"megalodon.files.tempfile.mkstemp": read_only}),
    Case("eval: files missing", lambda ws: ["eval", str(ws.model), "--files", str(ws.root / "nope.txt"), "--out",
                                            str(ws.root / "o3")], "does not exist"),
    Case("eval: files empty", lambda ws: ["eval", str(ws.model), "--files", str(ws.file("e.txt", "")), "--out",
                                          str(ws.root / "o4")], "no non-empty documents"),
    Case("eval: files not UTF-8", lambda ws: ["eval", str(ws.model), "--files", str(ws.file("b.txt", b"\xff\xfe")),
                                              "--out", str(ws.root / "o5")], "UTF-8"),
    Case("eval: no source", lambda ws: ["eval", str(ws.model), "--out", str(ws.root / "o6")], "required"),
    Case("eval: unknown corpus", lambda ws: ["eval", str(ws.model), "--corpus", "wikipedia", "--out",
                                             str(ws.root / "o7")], "--corpus"),
    Case("eval: token store of another tokenizer", lambda ws: ["eval", str(ws.model), "--corpus",
                                                               str(ws.bpe_store()), "--out", str(ws.root / "o8")],
         "another tokenizer"),
    Case("eval: store split missing", lambda ws: ["eval", str(ws.model), "--corpus", str(ws.byte_store()),
                                                  "--split", "dev", "--out", str(ws.root / "o9")], "split"),
    Case("eval: store meta.json corrupt", lambda ws: ["eval", str(ws.model), "--corpus", str(ws.byte_store(
        corrupt=True)), "--out", str(ws.root / "o10")], "meta.json"),
    Case("eval: bucket edges not numbers", lambda ws: ["eval", str(ws.model), "--files", str(ws.text),
                                                       "--bucket-edges", "0,a", "--out", str(ws.root / "o11")],
         "--bucket-edges"),
    Case("eval: bucket edges not from 0", lambda ws: ["eval", str(ws.model), "--files", str(ws.text),
                                                      "--bucket-edges", "5,10", "--out", str(ws.root / "o12")],
         "bucket edges"),
    Case("eval: block size off the chunk grid", lambda ws: ["eval", str(ws.model), "--files", str(ws.text),
                                                            "--block-size", "12", "--out", str(ws.root / "o13")],
         "chunk_size"),
    Case("eval: block size 0", lambda ws: ["eval", str(ws.model), "--files", str(ws.text), "--block-size", "0",
                                           "--out", str(ws.root / "o14")], "block_size"),
    Case("eval: max-docs 0", lambda ws: ["eval", str(ws.model), "--files", str(ws.text), "--max-docs", "0",
                                         "--out", str(ws.root / "o15")], "--max-docs"),
    Case("eval: window without a baseline", lambda ws: ["eval", str(ws.model), "--files", str(ws.text),
                                                        "--window", "8", "--out", str(ws.root / "o16")], "baseline"),
    Case("eval: window 0", lambda ws: ["eval", str(ws.model), "--baseline", str(ws.llama), "--files",
                                       str(ws.text), "--window", "0", "--out", str(ws.root / "o17")], "window"),
    Case("eval: baseline missing", lambda ws: ["eval", str(ws.model), "--baseline", str(ws.root / "nope"),
                                               "--files", str(ws.text), "--out", str(ws.root / "o18")],
         "no model directory"),
    Case("eval: truncate-chunks 1", lambda ws: ["eval", str(ws.model), "--files", str(ws.text),
                                                "--truncate-chunks", "1", "--out", str(ws.root / "o19")],
         "truncate_chunks"),
    Case("eval: split with files", lambda ws: ["eval", str(ws.model), "--files", str(ws.text), "--split", "val",
                                               "--out", str(ws.root / "o20")], "--split"),
    Case("eval: damaged model", lambda ws: ["eval", str(ws.damaged_model(lambda d: flip_last_byte(
        d / "model.safetensors"))), "--files", str(ws.text), "--out", str(ws.root / "o21")], "does not match"),
    # ---- convert
    Case("convert: from-reference without config", lambda ws: ["convert", "from-reference", str(ws.reference),
                                                                str(ws.root / "c1")], "--config"),
    Case("convert: config file missing", lambda ws: ["convert", "from-reference", str(ws.reference),
                                                     str(ws.root / "c2"), "--config", "/missing.json"],
         "no config file"),
    Case("convert: unknown preset", lambda ws: ["convert", "from-reference", str(ws.reference),
                                                str(ws.root / "c3"), "--config", "mega9000"], "preset"),
    Case("convert: config a list", lambda ws: ["convert", "from-reference", str(ws.reference), str(ws.root / "c4"),
                                               "--config", str(ws.file("list.json", "[1, 2]"))], "list.json"),
    Case("convert: config of another shape", lambda ws: ["convert", "from-reference", str(ws.reference),
                                                         str(ws.root / "c5"), "--config", "tiny",
                                                         "--vocab-size", "259"], "shape"),
    Case("convert: vocab size negative", lambda ws: ["convert", "from-reference", str(ws.reference),
                                                     str(ws.root / "c6"), "--config", "tiny", "--vocab-size", "-5"],
         "vocab_size"),
    Case("convert: source missing", lambda ws: ["convert", "from-reference", str(ws.root / "nope.pth"),
                                                str(ws.root / "c7"), "--config", str(ws.model / "config.json")],
         "no checkpoint"),
    Case("convert: source garbage .pth", lambda ws: ["convert", "from-reference", str(ws.file("g.pth",
                                                     os.urandom(300))), str(ws.root / "c8"), "--config",
                                                     str(ws.model / "config.json")], "weights-only"),
    Case("convert: source garbage .safetensors", lambda ws: ["convert", "from-reference", str(ws.file(
        "g.safetensors", os.urandom(300))), str(ws.root / "c9"), "--config", str(ws.model / "config.json")],
         "not a readable safetensors"),
    Case("convert: source a list of tensors", lambda ws: ["convert", "from-reference", str(ws.saved_pth(
        [torch.zeros(2)])), str(ws.root / "c10"), "--config", str(ws.model / "config.json")], "state_dict"),
    Case("convert: source with pickled code", lambda ws: ["convert", "from-reference", str(ws.code_pth()),
                                                          str(ws.root / "c11"), "--config",
                                                          str(ws.model / "config.json")], "never loaded"),
    Case("convert: source with a missing key", lambda ws: ["convert", "from-reference", str(ws.reference_without(
        "embed.weight")), str(ws.root / "c12"), "--config", str(ws.model / "config.json")], "missing"),
    Case("convert: source with NaN", lambda ws: ["convert", "from-reference", str(ws.reference_with_nan()),
                                                 str(ws.root / "c13"), "--config", str(ws.model / "config.json")],
         "non-finite"),
    Case("convert: output exists", lambda ws: ["convert", "from-reference", str(ws.reference), str(ws.copy()),
                                               "--config", str(ws.model / "config.json")], "--overwrite"),
    Case("convert: overwrite a directory that is not a model", lambda ws: [
        "convert", "from-reference", str(ws.reference), str(ws.root), "--config", str(ws.model / "config.json"),
        "--overwrite"], "not a model directory"),
    Case("convert: output under a file", lambda ws: ["convert", "from-reference", str(ws.reference),
                                                     str(ws.text / "out"), "--config", str(ws.model / "config.json")],
         "not a directory"),
    Case("convert: output on a full disk", lambda ws: ["convert", "from-reference", str(ws.reference),
                                                       str(ws.root / "c14"), "--config",
                                                       str(ws.model / "config.json")], "No space left",
         patches={"megalodon.files.os.fsync": full_disk}),
    Case("convert: to-reference from a missing directory", lambda ws: ["convert", "to-reference",
                                                                       str(ws.root / "nope"), str(ws.root / "r.pth")],
         "no model directory"),
    Case("convert: to-reference over an existing file", lambda ws: ["convert", "to-reference", str(ws.model),
                                                                    str(ws.copy(ws.text))], "--overwrite"),
    Case("convert: to-reference onto a directory", lambda ws: ["convert", "to-reference", str(ws.model),
                                                               str(ws.copy()), "--overwrite"], "directory"),
    Case("convert: to-reference from a damaged model", lambda ws: ["convert", "to-reference", str(
        ws.damaged_model(lambda d: flip_last_byte(d / "model.safetensors"))), str(ws.root / "r2.pth")],
         "does not match"),
    Case("convert: unknown direction", lambda ws: ["convert", "sideways", str(ws.model), str(ws.root / "x")],
         "invalid choice"),
]


def _api(fn) -> Callable[[Workspace], Callable[[], object]]:
    return lambda ws: (lambda: fn(ws))


def _session_of(ws, **changes):
    model = load_pretrained(ws.model)
    result, = generate(model, ByteTokenizer(), ["hi"], SamplingConfig(max_new_tokens=1))
    for name, value in changes.items():
        setattr(result.session, name, value)
    return model, result.session


def _doc(length=20):
    return EvalDocument(torch.randint(0, 259, (length,), generator=torch.Generator().manual_seed(0)), length, "d")


API_CASES = [
    Case("api: load_pretrained of a missing directory", _api(lambda ws: load_pretrained(ws.root / "nope")),
         "no model directory"),
    Case("api: load_pretrained of damaged weights", _api(lambda ws: load_pretrained(ws.damaged_model(
        lambda d: flip_last_byte(d / "model.safetensors")))), "does not match"),
    Case("api: load_pretrained of NaN weights", _api(lambda ws: load_pretrained(ws.damaged_model(nan_weights))),
         "non-finite"),
    Case("api: save_pretrained of NaN weights", _api(lambda ws: save_pretrained(_nan_model(), ws.root / "nan")),
         "non-finite"),
    Case("api: save_pretrained into a file's place", _api(lambda ws: save_pretrained(make_model(), ws.text)),
         "doc.txt"),
    Case("api: save_session over model weights", _api(lambda ws: save_session(
        ws.copy() / "model.safetensors", *_session_of(ws)[::-1], ByteTokenizer())), "not a session"),
    Case("api: save_session of a batch", _api(lambda ws: save_session(
        ws.root / "b.session", _batch_session(ws), load_pretrained(ws.model), ByteTokenizer())), "one conversation"),
    Case("api: load_session with another model", _api(lambda ws: load_session(
        ws.session, load_pretrained(ws.other), ByteTokenizer())), "different model"),
    Case("api: load_session of a damaged file", _api(lambda ws: load_session(
        ws.damaged_session(), load_pretrained(ws.model), ByteTokenizer())), "damaged"),
    Case("api: load_session of a bare state", _api(lambda ws: load_session(
        ws.bare_state(), load_pretrained(ws.model), ByteTokenizer())), "not a session"),
    Case("api: evaluate with truncate_chunks 2.5", _api(lambda ws: evaluate(make_model(), [_doc()],
                                                                            truncate_chunks=2.5)), "truncate_chunks"),
    Case("api: evaluate with truncate_chunks True", _api(lambda ws: evaluate(make_model(), [_doc()],
                                                                             truncate_chunks=True)), "truncate_chunks"),
    Case("api: evaluate with block_size '16'", _api(lambda ws: evaluate(make_model(), [_doc()], block_size="16")),
         "block_size"),
    Case("api: evaluate with bucket edges [0]", _api(lambda ws: evaluate(make_model(), [_doc()],
                                                                         bucket_edges=[0])), "bucket edges"),
    Case("api: evaluate with no documents", _api(lambda ws: evaluate(make_model(), [])), "nothing to predict"),
    Case("api: evaluate a non-model", _api(lambda ws: evaluate(torch.nn.Linear(2, 2), [_doc()])), "cannot evaluate"),
    Case("api: stream_blocks with a block off the grid", _api(lambda ws: list(stream_blocks(
        make_model(), _doc().ids, block_tokens=12))), "block_tokens"),
    Case("api: stream_blocks with a batch state", _api(lambda ws: list(stream_blocks(
        make_model(), _doc().ids, state=_batch_state()))), "one stream"),
    Case("api: final_logits_and_state of nothing", _api(lambda ws: final_logits_and_state(
        make_model(), torch.zeros(0, dtype=torch.int64))), "empty"),
    Case("api: RecencyWindow with truncate_chunks 2", _api(lambda ws: RecencyWindow.empty(2, 8, 0)),
         "truncate_chunks"),
    Case("api: generate with a state and sessions", _api(lambda ws: generate(
        make_model(), ByteTokenizer(), ["hi"], state=_batch_state(), sessions=[None])), "either state or sessions"),
    Case("api: generate with 2 sessions for 1 prompt", _api(lambda ws: generate(
        *_session_of(ws)[:1], ByteTokenizer(), ["hi"], sessions=[_session_of(ws)[1]] * 2)), "one session per prompt"),
    Case("api: generate with a tokenizer the model is too small for", _api(lambda ws: generate(
        make_model(vocab_size=200), ByteTokenizer(), ["hi"])), "they do not belong together"),
    Case("api: generate with more outputs than tokens", _api(lambda ws: generate(
        make_model(share_emb=False, output_size=300), ByteTokenizer(), ["hi"])), "so they must agree"),
    Case("api: generate with truncate_chunks '8'", _api(lambda ws: generate(
        make_model(), ByteTokenizer(), ["hi"], SamplingConfig(max_new_tokens=1), truncate_chunks="8")),
         "truncate_chunks"),
]


def _batch_state():
    model = make_model()
    with torch.no_grad():
        _, state = model(torch.zeros(2, 3, dtype=torch.int64), return_state=True)
    return state


def _batch_session(ws):
    _, session = _session_of(ws)
    session.state = _batch_state()
    return session


def _nan_model():
    model = make_model()
    with torch.no_grad():
        model.embed.weight.fill_(float("nan"))
    return model


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Workspace(tmp_path_factory.mktemp("sweep"))
    torch.set_num_threads(threads)
    torch.set_flush_denormal(False)


@pytest.mark.parametrize("case", CLI_CASES + API_CASES, ids=lambda case: case.name)
def test_bad_input_gets_a_clear_error(case, workspace):
    if "CPU-only" in case.name and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    outcome, message = run_case(case, workspace)
    assert outcome == "clear", message


if __name__ == "__main__":
    from collections import Counter

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as root:
        ws = Workspace(Path(root))
        tally, by_kind = Counter(), {}
        for case in CLI_CASES + API_CASES:
            outcome, message = run_case(case, ws)
            tally[outcome] += 1
            by_kind.setdefault(case.kind, Counter())[outcome] += 1
            if outcome != "clear":
                print(f"{outcome:9s} {case.name}: {message.strip()[:300]}")
    print(f"\n{sum(tally.values())} cases: " + ", ".join(f"{n} {k}" for k, n in tally.most_common()))
    for kind, counts in by_kind.items():
        print(f"  {kind:10s} " + ", ".join(f"{n} {k}" for k, n in counts.most_common()))

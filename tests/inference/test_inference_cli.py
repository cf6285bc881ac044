"""`megalodon generate` and `megalodon eval` through megalodon.cli.main, and their error exits."""

import io
import json
import os
import signal

import pytest

from megalodon.checkpoint import load_pretrained
from megalodon.cli import main
from megalodon.data import ByteTokenizer, build_token_store
from megalodon.inference import SamplingConfig, generate, load_session


@pytest.mark.parametrize("options", [[], ["--compile"]])
def test_generate_streams_the_same_text_as_the_api(model_dir, capsys, options):
    """The eager API's greedy text, whether the CLI's decode step runs eagerly or compiled."""
    assert main(["generate", str(model_dir), "--prompt", "Hello", "--max-new-tokens", "6", "--temperature", "0",
                 "--ignore-eos", *options]) == 0
    expected, = generate(load_pretrained(model_dir), ByteTokenizer(), ["Hello"],
                         SamplingConfig(temperature=0, max_new_tokens=6, stop_on_eos=False))
    captured = capsys.readouterr()
    assert captured.out == expected.text + "\n"
    assert "6 tokens" in captured.err


def test_generate_batches_prompts_and_reads_stdin(model_dir, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("from stdin"))
    assert main(["generate", str(model_dir), "--prompt", "a", "--prompt-file", "-", "--max-new-tokens", "3",
                 "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "--- prompt 0 ---" in out and "--- prompt 1 ---" in out


def test_sessions_continue_across_invocations(model_dir, tmp_path, capsys):
    book, session = tmp_path / "book.txt", tmp_path / "book.session"
    book.write_text("A tiny book. It has two sentences.")
    assert main(["generate", str(model_dir), "--prompt-file", str(book), "--prefill-only",
                 "--session-out", str(session), "--truncate-chunks", "3"]) == 0
    assert main(["generate", str(model_dir), "--session-in", str(session), "--prompt", " Why?",
                 "--max-new-tokens", "4", "--seed", "3", "--session-out", str(tmp_path / "next")]) == 0
    assert main(["generate", str(model_dir), "--session-in", str(tmp_path / "next"), "--max-new-tokens", "2"]) == 0
    assert "session saved" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--prompt", "x", "--temperature", "-1"], "temperature"),
    (["--prompt", "x", "--top-p", "0"], "top_p"),
    (["--prompt", "x", "--max-new-tokens", "0"], "max_new_tokens"),
    ([], "give a prompt"),
    (["--prompt", "a", "--prompt", "b", "--session-out", "s"], "one conversation"),
    (["--prompt", "x", "--prefill-only"], "--session-out"),
    (["--prompt-file", "/no/such/file"], "no file"),
    (["--prompt", "x", "--truncate-chunks", "1"], "truncate_chunks"),
])
def test_generate_misuse_exits_2_with_a_message(model_dir, capsys, argv, message):
    assert main(["generate", str(model_dir), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_generate_refuses_a_missing_model_and_a_llama(tmp_path, llama_dir, capsys):
    assert main(["generate", str(tmp_path / "nothing"), "--prompt", "x"]) == 2
    assert main(["generate", str(llama_dir), "--prompt", "x"]) == 2
    assert "needs a Megalodon model" in capsys.readouterr().err


def test_eval_writes_the_report_for_megalodon_truncation_and_baseline(model_dir, llama_dir, tmp_path, capsys):
    text = tmp_path / "doc.txt"
    text.write_text("Some text to evaluate, long enough for a few chunks of eight bytes each. " * 2)
    out = tmp_path / "report"
    assert main(["eval", str(model_dir), "--baseline", str(llama_dir), "--files", str(text), "--window", "16",
                 "--truncate-chunks", "3", "--out", str(out), "--bucket-edges", "0,16,64,1000"]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert [r["settings"].get("truncate_chunks") for r in report["results"]] == [None, 3, None]
    assert report["results"][2]["settings"]["window"] == 16
    assert [b["end"] for b in report["results"][0]["loss_by_position"]] == [16, 64, 1000]
    assert (out / "loss_by_position.png").is_file()
    assert "wrote" in capsys.readouterr().out


def test_generate_and_eval_run_in_the_dtype_asked_for(model_dir, llama_dir, tmp_path, capsys):
    """--dtype bf16 (or fp16) casts both models' weights (greedy text: the API's on the cast model); eval's
    figures stay close to fp32's, the loss summed in float64 from fp32 log-probabilities either way."""
    import torch

    from megalodon.inference.commands import _load_model

    assert _load_model(str(model_dir), "cpu", "auto")[0].embed.weight.dtype == torch.float32  # on a CPU
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        model, _ = _load_model(str(model_dir), "cpu", name)
        assert model.embed.weight.dtype == dtype
        assert main(["generate", str(model_dir), "--prompt", "Hello", "--max-new-tokens", "6", "--temperature", "0",
                     "--ignore-eos", "--dtype", name]) == 0
        expected, = generate(model, ByteTokenizer(), ["Hello"],
                             SamplingConfig(temperature=0, max_new_tokens=6, stop_on_eos=False))
        assert capsys.readouterr().out == expected.text + "\n"
    text = tmp_path / "doc.txt"
    text.write_text("Some text to evaluate, long enough for a few chunks of eight bytes each. " * 2)
    figures = {}
    for dtype in ("fp32", "bf16"):
        assert main(["eval", str(model_dir), "--baseline", str(llama_dir), "--files", str(text), "--window", "16",
                     "--out", str(tmp_path / dtype), "--dtype", dtype]) == 0
        report = json.loads((tmp_path / dtype / "eval.json").read_text())
        figures[dtype] = [r["bits_per_byte"] for r in report["results"]]
        assert report["dtype"] == dtype
    assert all(abs(a - b) < 0.02 * a for a, b in zip(figures["fp32"], figures["bf16"])), figures
    assert figures["fp32"] != figures["bf16"]


def test_a_session_continues_only_in_the_dtype_that_wrote_it(model_dir, tmp_path, capsys):
    session = tmp_path / "bf16.session"
    assert main(["generate", str(model_dir), "--prompt", "A tiny book.", "--prefill-only", "--session-out",
                 str(session), "--dtype", "bf16"]) == 0
    assert main(["generate", str(model_dir), "--session-in", str(session), "--max-new-tokens", "2"]) == 2
    assert "written by the model in bf16, and this one runs in fp32" in capsys.readouterr().err
    assert main(["generate", str(model_dir), "--session-in", str(session), "--max-new-tokens", "2", "--dtype",
                 "bf16"]) == 0


def test_auto_is_bf16_on_a_gpu_with_bf16_tensor_cores_only(monkeypatch):
    import torch

    from megalodon import precision

    assert precision.inference_dtype("auto", torch.device("cpu")) == torch.float32  # even with AMX
    monkeypatch.setattr(precision, "fast_bf16", lambda device: device.type == "cuda")
    assert precision.inference_dtype("auto", torch.device("cuda")) == torch.bfloat16
    monkeypatch.setattr(precision, "fast_bf16", lambda device: False)  # a V100, a T4
    assert precision.inference_dtype("auto", torch.device("cuda")) == torch.float32
    assert precision.inference_dtype("fp16", torch.device("cpu")) == torch.float16


def test_eval_reads_a_token_store_split(model_dir, tmp_path):
    store = build_token_store([f"document number {i}, with words." for i in range(60)], ByteTokenizer(),
                              tmp_path / "store")
    assert main(["eval", str(model_dir), "--corpus", str(store), "--split", "val", "--out", str(tmp_path / "o"),
                 "--max-docs", "2"]) == 0
    report = json.loads((tmp_path / "o" / "eval.json").read_text())
    assert report["split"] == "val" and len(report["results"][0]["documents"]) == 2


@pytest.mark.parametrize("argv, message", [
    (["--files", "F", "--split", "test"], "--split"),
    (["--files", "F", "--window", "8"], "Llama baseline"),
    (["--corpus", "no-such-corpus"], "--corpus must be one of"),
    (["--files", "F", "--bucket-edges", "0,x"], "--bucket-edges"),
    (["--files", "F", "--bucket-edges", "5,10"], "bucket edges"),
    (["--files", "F", "--block-size", "12"], "multiple of chunk_size"),
])
def test_eval_misuse_exits_2_with_a_message(model_dir, tmp_path, capsys, argv, message):
    doc = tmp_path / "doc.txt"
    doc.write_text("some words")
    argv = [str(doc) if a == "F" else a for a in argv]
    assert main(["eval", str(model_dir), *argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_argument_errors_exit_2(model_dir, capsys):
    assert main(["eval", str(model_dir), "--files", "x"]) == 2  # --out is required
    assert "required: --out" in capsys.readouterr().err
    assert main(["eval", str(model_dir), "--files", "x", "--window", "4", "--max-context", "8", "--out", "o"]) == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_eval_splits_a_builtin_corpus_like_the_trainer(model_dir, tmp_path):
    plays = tmp_path / "data" / "corpora" / "shakespeare"  # a pre-filled corpus cache: nothing is downloaded
    plays.mkdir(parents=True)
    for i in range(40):
        (plays / f"play{i:02d}_gut.txt").write_text(f"Act {i}. Enter a tiny player.\n")
    argv = ["eval", str(model_dir), "--corpus", "shakespeare", "--data-dir", str(tmp_path / "data"),
            "--split-seed", "3", "--out", str(tmp_path / "o")]
    assert main(argv) == 0
    report = json.loads((tmp_path / "o" / "eval.json").read_text())
    assert report["split"] == "test" and len(report["results"][0]["documents"]) == 2  # 5% of 40
    assert list((tmp_path / "data" / "stores").glob("eval-shakespeare-*-s3"))


@pytest.mark.parametrize("target", ["model.safetensors", "config.json", "tokenizer_config.json", "."])
def test_a_session_is_never_written_over_a_model_file(model_dir, capsys, target):
    before = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    for extra in ([], ["--prefill-only"]):
        assert main(["generate", str(model_dir), "--prompt", "hi", "--max-new-tokens", "2",
                     "--session-out", str(model_dir / target), *extra]) == 2
        err = capsys.readouterr().err
        assert "not a session" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in model_dir.iterdir()} == before
    load_pretrained(model_dir)


def test_a_session_file_is_replaced_by_the_next_turn(model_dir, tmp_path):
    session = tmp_path / "chat.session"
    assert main(["generate", str(model_dir), "--prompt", "hi", "--max-new-tokens", "2", "--seed", "1",
                 "--session-out", str(session)]) == 0
    first = session.read_bytes()
    assert main(["generate", str(model_dir), "--session-in", str(session), "--max-new-tokens", "2",
                 "--session-out", str(session)]) == 0
    assert session.read_bytes() != first


class CtrlCAfter:
    """A stdout that presses Ctrl-C (a real SIGINT to this process) `presses` times after `writes` writes."""

    def __init__(self, writes: int, presses: int = 1):
        self.text, self.writes, self.presses = "", writes, presses

    def write(self, text: str) -> None:
        self.text += text
        self.writes -= 1
        if self.writes == 0:
            for _ in range(self.presses):
                os.kill(os.getpid(), signal.SIGINT)

    def flush(self) -> None:
        pass


def test_ctrl_c_while_generating_prints_the_text_and_saves_the_session(model_dir, tmp_path, capsys, monkeypatch):
    session = tmp_path / "chat.session"
    argv = ["generate", str(model_dir), "--prompt", "Once", "--max-new-tokens", "500", "--ignore-eos",
            "--seed", "4", "--session-out", str(session)]
    stdout = CtrlCAfter(writes=5)
    monkeypatch.setattr("sys.stdout", stdout)
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "stopped by: interrupted" in err and "session saved" in err and "Traceback" not in err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    model = load_pretrained(model_dir)
    saved = load_session(session, model, ByteTokenizer())
    generated = saved.generated_ids
    assert 5 <= len(generated) < 20 and saved.position == 4 + len(generated)
    assert stdout.text == ByteTokenizer().decode(generated) + "\n"
    # The session continues exactly as an uninterrupted run would have.
    whole, = generate(model, ByteTokenizer(), ["Once"], SamplingConfig(max_new_tokens=len(generated) + 5,
                                                                     stop_on_eos=False, seed=4))
    rest, = generate(model, ByteTokenizer(), [""], SamplingConfig(max_new_tokens=5, stop_on_eos=False),
                     sessions=[saved])
    assert generated + rest.ids == whole.ids


def test_a_second_ctrl_c_quits_at_once_and_keeps_the_old_session(model_dir, tmp_path, capsys, monkeypatch):
    session = tmp_path / "chat.session"
    assert main(["generate", str(model_dir), "--prompt", "hi", "--max-new-tokens", "2", "--session-out",
                 str(session)]) == 0
    before = session.read_bytes()
    monkeypatch.setattr("sys.stdout", CtrlCAfter(writes=3, presses=2))
    assert main(["generate", str(model_dir), "--session-in", str(session), "--max-new-tokens", "500",
                 "--ignore-eos", "--session-out", str(session)]) == 130
    err = capsys.readouterr().err
    assert "second Ctrl-C" in err and "nothing was saved" in err and "Traceback" not in err
    assert session.read_bytes() == before


def test_ctrl_c_while_reading_a_prompt_stops_and_saves_nothing(model_dir, tmp_path, capsys, monkeypatch):
    from megalodon.inference import console

    monkeypatch.setattr(console, "PROGRESS_DELAY_S", 0.0)
    calls = []
    update = console.PrefillBar.update

    def press_ctrl_c(self, row, read, total):
        update(self, row, read, total)
        calls.append((read, total))
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(console.PrefillBar, "update", press_ctrl_c)
    monkeypatch.setattr("megalodon.inference.stream.PREFILL_TOKENS", 16)  # 2-chunk blocks: several updates
    book = tmp_path / "book.txt"
    book.write_text("word " * 20)
    assert main(["generate", str(model_dir), "--prompt-file", str(book), "--prefill-only", "--session-out",
                 str(tmp_path / "s")]) == 130
    err = capsys.readouterr().err
    assert "interrupted while reading the prompt (32 of 100 tokens read)" in err and "Traceback" not in err
    assert calls == [(16, 100), (32, 100)] and not (tmp_path / "s").exists()


def test_a_slow_prefill_shows_a_progress_bar_on_stderr(model_dir, tmp_path, capsys, monkeypatch):
    from megalodon.inference import console

    book = tmp_path / "book.txt"
    book.write_text("word " * 20)
    argv = ["generate", str(model_dir), "--prompt-file", str(book), "--max-new-tokens", "2"]
    assert main(argv) == 0
    assert "reading the prompt" not in capsys.readouterr().err  # fast: no bar
    monkeypatch.setattr(console, "PROGRESS_DELAY_S", 0.0)
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "reading the prompt: 100/100 (100%)" in captured.err  # stderr is no terminal here: a plain line
    assert "reading" not in captured.out


@pytest.mark.slow
def test_ctrl_c_on_a_real_generate_process(model_dir, tmp_path):
    import subprocess
    import sys
    import time

    session = tmp_path / "chat.session"
    child = subprocess.Popen(
        [sys.executable, "-m", "megalodon", "generate", str(model_dir), "--prompt", "Once", "--max-new-tokens",
         "100000", "--ignore-eos", "--session-out", str(session), "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=lambda: signal.signal(signal.SIGINT,
                                                                                          signal.SIG_DFL))
    try:
        first = child.stdout.read(1)  # the first token is out: generation is under way
        time.sleep(0.2)
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=60)
    finally:
        child.kill()
    err = err.decode()
    assert first and child.returncode == 130, err
    assert "stopped by: interrupted" in err and "Traceback" not in err
    saved = load_session(session, load_pretrained(model_dir), ByteTokenizer())
    assert saved.position == 4 + len(saved.generated_ids) > 5

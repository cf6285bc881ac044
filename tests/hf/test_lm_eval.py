"""lm-evaluation-harness over local jsonl tasks, through the Python API on an in-memory model, to the numbers the
model's own log-probabilities give. The lm_eval CLI on an exported directory is the hf README's command, which
tests/test_readme_commands.py runs; that the export computes the package's logits is tests/hf/test_remote_code.py's."""

import pytest

pytest.importorskip("transformers")
pytest.importorskip("lm_eval")

import json  # noqa: E402
import math  # noqa: E402

import torch  # noqa: E402

from megalodon.data import ByteTokenizer  # noqa: E402
from megalodon.hf import lm_eval_task, to_hf_tokenizer, wrap  # noqa: E402

DOCUMENTS = ["The quick brown fox jumps over the lazy dog.",
             "Call me Ishmael. Some years ago, never mind how long precisely.",
             "It was the best of times, it was the worst of times."]
QUESTIONS = [{"question": "The capital of France is", "choices": ["Paris", "London", "Rome"], "answer": 0},
             {"question": "Two plus two is", "choices": ["three", "four"], "answer": 1}]
EOS = 257  # the byte tokenizer's end of document: the context every document was trained after


@pytest.fixture
def task_dir(tmp_path):
    for name, rows in (("docs", [{"text": d} for d in DOCUMENTS]), ("questions", QUESTIONS)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    lm_eval_task(tmp_path / "tasks", "tiny_ppl", tmp_path / "docs.jsonl")
    lm_eval_task(tmp_path / "tasks", "tiny_mc", tmp_path / "questions.jsonl", kind="multiple_choice")
    return tmp_path / "tasks"


def test_a_task_of_an_unknown_kind_or_a_missing_file_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"kind must be one of \('perplexity', 'multiple_choice'\), got 'qa'"):
        lm_eval_task(tmp_path, "t", tmp_path / "docs.jsonl", kind="qa")
    with pytest.raises(FileNotFoundError, match="no data file at .*missing.jsonl"):
        lm_eval_task(tmp_path, "t", tmp_path / "missing.jsonl")
    assert not (tmp_path / "t.yaml").exists()


def _log_prob(core, context: list[int], continuation: list[int]) -> float:
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        log_probs = core(ids)[0, len(context) - 1:-1].double().log_softmax(-1)
    return float(log_probs.gather(-1, torch.tensor(continuation)[:, None]).sum())


def _expected_bits_per_byte(core) -> float:
    total = sum(_log_prob(core, [EOS], list(doc.encode())) for doc in DOCUMENTS)
    return -total / sum(len(doc.encode()) for doc in DOCUMENTS) / math.log(2)


def _expected_accuracy(core) -> float:
    correct = 0
    for q in QUESTIONS:
        scores = [_log_prob(core, list(q["question"].encode()), list((" " + c).encode())) for c in q["choices"]]
        correct += max(range(len(scores)), key=scores.__getitem__) == q["answer"]
    return correct / len(QUESTIONS)


def test_python_api_on_an_in_memory_model(core, task_dir):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model = wrap(core, bos_token_id=256, eos_token_id=EOS, pad_token_id=258)
    lm = HFLM(pretrained=model, tokenizer=to_hf_tokenizer(ByteTokenizer()), backend="causal", batch_size=2,
              prefix_token_id=EOS)
    results = lm_eval.simple_evaluate(model=lm, tasks=["tiny_ppl", "tiny_mc"],
                                      task_manager=TaskManager(include_path=str(task_dir), include_defaults=False))
    ppl, mc = results["results"]["tiny_ppl"], results["results"]["tiny_mc"]
    assert math.isfinite(ppl["word_perplexity,none"]) and ppl["word_perplexity,none"] > 1
    assert ppl["bits_per_byte,none"] == pytest.approx(_expected_bits_per_byte(core), rel=1e-5)
    assert mc["acc,none"] == pytest.approx(_expected_accuracy(core))

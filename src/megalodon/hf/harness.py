"""lm-evaluation-harness task files over a local jsonl: no dataset download, no bundled task needed.

lm-eval's bundled tasks ship no data (they fetch it from the Hub), so an offline evaluation brings its own
jsonl and a task YAML that reads it with the `json` dataset builder. Two kinds:
- "perplexity": rows {"text": ...}; loglikelihood_rolling over each whole document, reporting
  word_perplexity, byte_perplexity and bits_per_byte.
- "multiple_choice": rows {"question": ..., "choices": [...], "answer": <index>}; reports acc and acc_norm.
"""

from __future__ import annotations

from pathlib import Path

from megalodon.optional import install_step

KINDS = ("perplexity", "multiple_choice")


def lm_eval_task(directory: str | Path, name: str, data_file: str | Path, kind: str = "perplexity",
                 text_field: str = "text", question_field: str = "question", choices_field: str = "choices",
                 answer_field: str = "answer") -> Path:
    """Write `<directory>/<name>.yaml`, a task over `data_file`; pass `directory` to lm-eval as include_path."""
    try:
        import yaml  # a dependency of lm-eval, which is the only user of this file
    except ImportError:
        raise ImportError(f"lm_eval_task writes YAML for lm-eval: {install_step('lm_eval')}") from None

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    data_file = Path(data_file).resolve()
    if not data_file.is_file():
        raise FileNotFoundError(f"no data file at {data_file}")
    task = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
    }
    if kind == "perplexity":
        task.update({
            "output_type": "loglikelihood_rolling",
            "doc_to_text": "",
            "doc_to_target": f"{{{{{text_field}}}}}",
            "metric_list": [
                {"metric": "word_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
                {"metric": "byte_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
                {"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False},
            ],
        })
    else:
        task.update({
            "output_type": "multiple_choice",
            "doc_to_text": f"{{{{{question_field}}}}}",
            "doc_to_choice": choices_field,
            "doc_to_target": answer_field,
            "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                            for m in ("acc", "acc_norm")],
        })
    task["metadata"] = {"version": 1.0}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(task, sort_keys=False))
    return path

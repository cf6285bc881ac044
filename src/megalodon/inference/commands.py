"""The `megalodon generate` and `megalodon eval` subcommands: argument parsing and the glue to the Python API.

Errors a user can cause (bad values, missing files, mismatched models) are raised as ValueError or
FileNotFoundError, which `megalodon.cli.main` turns into a message and exit code 2.
"""

from __future__ import annotations

import itertools
import sys
import time
from pathlib import Path

DEFAULT_DATA_DIR = "data"  # the trainer's default too, so that corpora are fetched once


# ---- generate ----------------------------------------------------------------------------------------------------
def add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a model directory, streaming to stdout",
                       description="Generate a continuation of each prompt. One prompt streams as it is generated; "
                                   "several run as one batch and print when done.")
    p.add_argument("model_dir", help="model directory (config.json, model.safetensors, tokenizer)")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt (repeat for a batch)")
    p.add_argument("--prompt-file", metavar="F", help="a file whose whole text is one prompt; '-' reads stdin")
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="tokens to generate per prompt")
    p.add_argument("--temperature", type=float, default=1.0, metavar="T", help="0: greedy")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="sample from the K likeliest tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="sample from the likeliest tokens whose probabilities sum to P (1: all)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R", help="1: off")
    p.add_argument("--seed", type=int, default=None, metavar="N",
                   help="random seed (default: drawn; a session keeps its own)")
    p.add_argument("--stop", action="append", default=[], metavar="STR", help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating after end-of-sequence")
    p.add_argument("--session-in", metavar="F", help="continue the conversation saved in this session file")
    p.add_argument("--session-out", metavar="F", help="save the conversation to this session file")
    p.add_argument("--prefill-only", action="store_true",
                   help="read the prompt into --session-out without generating (e.g. a book to ask about later)")
    p.add_argument("--truncate-chunks", type=int, default=None, metavar="N",
                   help="recency-windowed norm statistics (spec section 13); off by default")
    p.add_argument("--compile", action="store_true",
                   help="run the decode step through torch.compile: it compiles first (tens of seconds), then each "
                        "token costs a few fused kernels instead of hundreds of ops; worth it for long outputs")
    _add_runtime_args(p)
    p.set_defaults(run=run_generate)


def _add_runtime_args(p) -> None:
    from megalodon.cli_options import add_device_option

    add_device_option(p)
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="the weights' type: auto is bf16 on a GPU with bf16 tensor cores (half the memory and the "
                        "bytes per token), fp32 elsewhere; the CEMA and norm statistics stay fp32 in any")
    p.add_argument("--threads", type=int, default=0, metavar="N", help="torch CPU threads (0: torch's choice)")


def _set_up_torch(args) -> None:
    import torch

    torch.set_flush_denormal(True)  # denormals slow fp32 math several-fold on these CPUs
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0 (0 = torch's choice), got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)


def _read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file is not None:
        if args.prompt_file == "-":
            try:
                prompts.append(sys.stdin.read())
            except UnicodeDecodeError as err:
                raise ValueError(f"--prompt-file - : standard input is not UTF-8 text ({err.reason} at byte "
                                 f"{err.start}); convert it first, e.g. iconv -f latin1 -t utf-8") from None
        else:
            path = Path(args.prompt_file)
            if not path.is_file():
                raise FileNotFoundError(f"--prompt-file: no file at {path}"
                                        + (" (it is a directory)" if path.is_dir() else ""))
            prompts.append(_utf8(path.read_bytes(), f"--prompt-file {path}"))
    if not prompts:
        if args.session_in is None:
            raise ValueError("give a prompt with --prompt TEXT or --prompt-file F (or continue --session-in F)")
        prompts = [""]  # continue the session's own text
    if (args.session_in or args.session_out) and len(prompts) != 1:
        raise ValueError(f"a session holds one conversation: give one prompt with --session-in/--session-out, "
                         f"got {len(prompts)}")
    return prompts


def _utf8(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{what} is not UTF-8 text (byte {err.start}: {data[err.start:err.start + 1]!r}); "
                         "convert it first, e.g. iconv -f latin1 -t utf-8") from None


def run_generate(args) -> int:
    from megalodon.files import check_writable_dir
    from megalodon.inference.sampling import SamplingConfig
    from megalodon.inference.session import check_session_target, load_session

    _set_up_torch(args)
    if args.prefill_only and not args.session_out:
        raise ValueError("--prefill-only needs --session-out F: the session is its only output")
    if args.session_out:  # before the work: a session never replaces a model file, and must be writable
        check_session_target(args.session_out)
        check_writable_dir(Path(args.session_out).parent, "--session-out")
    prompts = _read_prompts(args)
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              repetition_penalty=args.repetition_penalty, seed=args.seed,
                              max_new_tokens=args.max_new_tokens, stop_strings=tuple(args.stop),
                              stop_on_eos=not args.ignore_eos)
    model, tokenizer = _load_model(args.model_dir, args.device, args.dtype)
    sessions = None if args.session_in is None else [load_session(args.session_in, model, tokenizer)]
    return _GenerateRun(args, model, tokenizer, prompts, sampling, sessions).run()


class _GenerateRun:
    """One `megalodon generate`: a progress bar while prompts are read, tokens streamed as they come, and Ctrl-C
    answered (during reading: stop, nothing saved; during generation: stop after the token, print the text,
    save the session; a second Ctrl-C: quit at once)."""

    def __init__(self, args, model, tokenizer, prompts, sampling, sessions):
        from megalodon.inference.console import PrefillBar

        self.args, self.model, self.tokenizer, self.prompts = args, model, tokenizer, prompts
        self.sampling, self.sessions = sampling, sessions
        self.streaming = len(prompts) == 1
        self.bar = PrefillBar(len(prompts))
        self.decoding = False

    def run(self) -> int:
        from megalodon.inference.console import CtrlC

        with CtrlC() as self.ctrl_c:
            try:
                return self._prefill_only() if self.args.prefill_only else self._generate()
            except KeyboardInterrupt:
                self.bar.close()
                print(f"\n[{self._interrupted_where()}; nothing was saved]", file=sys.stderr)
                return 130
            finally:
                self.bar.close()

    def _interrupted_where(self) -> str:
        if self.decoding:
            return "stopped at once by a second Ctrl-C"
        return f"interrupted while reading the prompt ({self.bar.read} of {self.bar.total} tokens read)"

    def _on_prefill(self, row: int, read: int, total: int) -> None:
        self.bar.update(row, read, total)
        if self.ctrl_c.requested:
            raise KeyboardInterrupt

    def _on_token(self, row: int, token: int, text: str) -> None:
        if not self.decoding:
            self.decoding = True
            self.bar.close()
        if self.streaming and text:
            sys.stdout.write(text)
            sys.stdout.flush()

    def _prefill_only(self) -> int:
        from megalodon.inference.generate import prefill_session

        session = prefill_session(self.model, self.tokenizer, self.prompts[0],
                                  None if self.sessions is None else self.sessions[0], self.args.truncate_chunks,
                                  progress=lambda read, total: self._on_prefill(0, read, total))
        self.bar.close()
        self._save(session)
        print(f"[read {session.position} tokens into {self.args.session_out}]", file=sys.stderr)
        return 0

    def _generate(self) -> int:
        from megalodon.inference.generate import generate

        start = time.perf_counter()
        results = generate(self.model, self.tokenizer, self.prompts, self.sampling, sessions=self.sessions,
                           on_token=self._on_token, truncate_chunks=self.args.truncate_chunks,
                           prefill_progress=self._on_prefill, should_stop=lambda: self.ctrl_c.requested,
                           compile=self.args.compile)
        elapsed = time.perf_counter() - start
        if self.streaming:
            sys.stdout.write("\n")
        else:
            for i, result in enumerate(results):
                sys.stdout.write(f"--- prompt {i} ---\n{result.text}\n")
        sys.stdout.flush()
        generated = sum(len(r.ids) for r in results)
        reasons = ", ".join(r.finish_reason for r in results)
        print(f"[{generated} tokens in {elapsed:.2f} s ({generated / max(elapsed, 1e-9):.1f} tokens/s); "
              f"stopped by: {reasons}]", file=sys.stderr)
        if self.args.session_out:
            self._save(results[0].session)
            print(f"[session saved to {self.args.session_out} at position {results[0].session.position}]",
                  file=sys.stderr)
        return 130 if any(r.finish_reason == "interrupted" for r in results) else 0

    def _save(self, session) -> None:
        from megalodon.inference.session import save_session

        save_session(self.args.session_out, session, self.model, self.tokenizer)


def _load_model(model_dir: str, device: str, dtype: str):
    """The model in the --dtype asked for, on the device, and its tokenizer. A model cast from its fp32 weights is
    built on the CPU and cast on its way to the device, which then never holds the fp32 copy."""
    import torch

    from megalodon.checkpoint import load_pretrained
    from megalodon.data import load_tokenizer
    from megalodon.precision import inference_dtype

    dtype = inference_dtype(dtype, torch.device(device))
    if dtype == torch.float32:
        model = load_pretrained(model_dir, map_location=device)
    else:
        model = load_pretrained(model_dir).to(device=device, dtype=dtype)
    return model, load_tokenizer(model_dir)


# ---- eval --------------------------------------------------------------------------------------------------------
def add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="long-document perplexity, bits/byte and loss by position",
                       description="Stream whole documents through the model (and a baseline) and write "
                                   "eval.json and loss_by_position.png into --out.")
    p.add_argument("model_dir", help="model directory (Megalodon, or a Llama baseline)")
    p.add_argument("--baseline", metavar="LLAMA_DIR", help="a Llama baseline directory to evaluate alongside")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--corpus", metavar="NAME", help="shakespeare, bible, austen, or a token-store directory")
    source.add_argument("--files", nargs="+", metavar="F",
                        help="text/jsonl (plain, .gz, .zst), parquet or arrow files, or directories: every "
                             "document")
    p.add_argument("--split", default=None, help="split of --corpus to evaluate (default: test)")
    attention = p.add_mutually_exclusive_group()
    attention.add_argument("--window", type=int, metavar="W", help="baseline: sliding attention window")
    attention.add_argument("--max-context", type=int, metavar="N",
                           help="baseline: full attention up to N tokens, then a sliding window of N "
                                "(default 8192)")
    p.add_argument("--truncate-chunks", type=int, metavar="N",
                   help="also evaluate Megalodon with truncate_chunks=N and report both")
    p.add_argument("--out", required=True, metavar="DIR", help="where eval.json and the PNG go")
    p.add_argument("--block-size", type=int, metavar="N", help="tokens per call (Megalodon: multiple of chunk)")
    p.add_argument("--bucket-edges", metavar="E", help="comma-separated, from 0 (default: 0,1024,2048,4096,...)")
    p.add_argument("--max-docs", type=int, metavar="N", help="evaluate only the first N documents")
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR, metavar="DIR", help="cache of corpora and token stores")
    p.add_argument("--split-seed", type=int, default=0, metavar="N",
                   help="seed of the document split of a built-in --corpus; use the training run's seed to get "
                        "its held-out documents (or pass its token-store directory as --corpus)")
    _add_runtime_args(p)
    p.set_defaults(run=run_eval)


def run_eval(args) -> int:
    from megalodon.files import check_writable_dir
    from megalodon.inference.evaluate import (
        DEFAULT_MAX_CONTEXT, default_bucket_edges, evaluate, write_report,
    )

    from megalodon.precision import dtype_name

    _set_up_torch(args)
    check_writable_dir(args.out, "--out")  # before the work, which may take hours
    if args.split is not None and args.files:
        raise ValueError("--split selects part of a --corpus; --files evaluates every document of the files")
    if args.max_docs is not None and args.max_docs < 1:
        raise ValueError(f"--max-docs must be >= 1, got {args.max_docs}")
    edges = _parse_edges(args.bucket_edges)
    model, tokenizer = _load_model(args.model_dir, args.device, args.dtype)
    entries = [(Path(args.model_dir).name, model, tokenizer)]
    if args.baseline:
        baseline, baseline_tokenizer = _load_model(args.baseline, args.device, args.dtype)
        entries.append((Path(args.baseline).name, baseline, baseline_tokenizer))
    from megalodon.baseline import Llama

    if (args.window or args.max_context) and not any(isinstance(m, Llama) for _, m, _ in entries):
        raise ValueError("--window and --max-context apply to a Llama baseline (--baseline LLAMA_DIR); "
                         "Megalodon needs neither")
    docs = {}  # tokenizer fingerprint -> documents: models that share a tokenizer share the documents
    for _, _, tok in entries:
        docs.setdefault(tok.fingerprint(), _documents(args, tok))
    if edges is None:  # shared edges, so that every curve has the same buckets
        edges = default_bucket_edges(max(d.ids.numel() for ds in docs.values() for d in ds))

    max_context = args.max_context if args.max_context is not None else DEFAULT_MAX_CONTEXT
    runs = []
    for _, m, tok in entries:
        is_llama, documents = isinstance(m, Llama), docs[tok.fingerprint()]
        common = dict(block_size=args.block_size if not is_llama else None, bucket_edges=edges, progress=True)
        if is_llama:
            attention = f"window {args.window}" if args.window else f"full attention to {max_context}, then window"
            runs.append(evaluate(m, documents, label=f"Llama ({attention})", window=args.window,
                                 max_context=max_context, **common))
            continue
        runs.append(evaluate(m, documents, label="Megalodon", **common))
        if args.truncate_chunks is not None:
            runs.append(evaluate(m, documents, label=f"Megalodon, truncate_chunks={args.truncate_chunks}",
                                 truncate_chunks=args.truncate_chunks, **common))
    info = {"model": args.model_dir, "baseline": args.baseline, "corpus": args.corpus or args.files,
            "split": None if args.files else (args.split or "test"), "documents": len(next(iter(docs.values()))),
            "dtype": dtype_name(next(model.parameters()).dtype)}  # what --dtype auto chose
    json_path, png_path = write_report(runs, args.out, info)
    for run in runs:
        print(f"{run.label:40s} ppl {run.perplexity:10.3f}  bits/byte {run.bits_per_byte:.4f}  "
              f"tokens {run.n_tokens}  peak state {run.peak_state_bytes / 1024:.1f} KiB")
    print(f"wrote {json_path} and {png_path}")
    return 0


def _parse_edges(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        edges = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--bucket-edges must be comma-separated integers, got {text!r}") from None
    from megalodon.inference.evaluate import check_bucket_edges

    return check_bucket_edges(edges)


def _documents(args, tokenizer):
    """The evaluation documents, tokenized with this tokenizer."""
    from megalodon.data import BUILTIN_CORPORA, TokenStore, UserDocuments, build_token_store, load_corpus
    from megalodon.inference.evaluate import documents_from_store, documents_from_texts

    if args.files:
        # read a document at a time, no further than max_docs
        return documents_from_texts(itertools.islice(UserDocuments(args.files), args.max_docs), tokenizer)
    split = args.split or "test"
    corpus = Path(args.corpus)
    if (corpus / "meta.json").is_file():
        store = TokenStore(corpus, split)
        if store.tokenizer_fingerprint != tokenizer.fingerprint():
            raise ValueError(f"the token store {corpus} was built with another tokenizer than the model's; "
                             "evaluate with --files, or rebuild the store with the model's tokenizer")
        return documents_from_store(store, args.max_docs)
    if args.corpus not in BUILTIN_CORPORA:
        raise ValueError(f"--corpus must be one of {list(BUILTIN_CORPORA)} or a token-store directory, got "
                         f"{args.corpus!r}; use --files for your own text files")
    data_dir = Path(args.data_dir).expanduser()
    store_dir = data_dir / "stores" / f"eval-{args.corpus}-{tokenizer.fingerprint()}-s{args.split_seed}"
    if not (store_dir / "meta.json").is_file():
        try:
            texts = load_corpus(args.corpus, data_dir / "corpora")
        except RuntimeError as err:  # a missing tool or network: the user's environment, not a bug
            raise ValueError(f"could not load the corpus {args.corpus!r}: {err}") from None
        # The default split fractions: the same documents per split as the trainer's store with this seed.
        build_token_store(texts, tokenizer, store_dir, seed=args.split_seed, overwrite=True)
    return documents_from_store(TokenStore(store_dir, split), args.max_docs)

"""Tokenize-stage throughput against raw ``Tokenizer.encode_batch_fast``, side by side in one run.

    python bench/tokenize.py [--quick] [--text FILE] [--copies N] [--rounds R] [--batch-docs N]

Input: Tiny Shakespeare (``--text``, default ../shared/data/tinyshakespeare.txt beside the
repository; an error when it is missing) repeated ``--copies`` times as one file, cut into
documents by the corpus stage; ``--quick`` uses the embedded pydoc corpus once instead. For each
tokenizer (char; byte-level BPE 512):

- ``stage``: the whole tokenize stage (JSONL read, encode, Arrow shards, sha256, manifest) with the
  already-trained ``tokenizer.json`` passed as kind ``file``, so BPE training is not timed;
- ``raw``: ``encode_batch_fast`` of the same tokenizer over the same documents, already in memory,
  in the stage's batches (``batch_docs`` documents or 2²⁰ characters), ids not even read back;

they run side by side (``bench.common.alternating_timings``: one untimed warm-up round, then
``--rounds`` rounds in alternating order) and the fastest round of each is kept, since other
load on the machine only ever slows a round down. MB = 10⁶ bytes of UTF-8 text. Also: the char
tokenizer's raw encode against a plain Python dict lookup per character (timed in the same
rounds). ``--quick`` is a smoke test: on 0.47 MB the stage's fixed costs (tokenizer load and
save, fsync) dominate its ratio. Rows go to results/bench/tokenize.parquet (--quick:
results/bench/quick/).
"""

from __future__ import annotations

import os
import sys

# Run as a script, this file's directory comes first on sys.path, where this file would shadow the
# standard library's ``tokenize`` (imported by inspect, linecache, torch …): use the repo root.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(_HERE)] + [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import argparse  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

from tokenizers import Tokenizer  # noqa: E402

from bench.common import add_out_argument, alternating_timings, machine, parse_bench_args, row, save_rows  # noqa: E402
from lipflow.data.corpus import CorpusConfig, build_corpus  # noqa: E402
from lipflow.data.tokenize import TokenizerConfig, batched, iter_texts, tokenize_corpus  # noqa: E402
from lipflow.errors import summary_of  # noqa: E402

BENCH = "tokenize"
TINY_SHAKESPEARE = Path(_HERE).parent.parent / "shared" / "data" / "tinyshakespeare.txt"  # ../shared


def build_input(work: Path, text: Path | None, copies: int) -> Path:
    if text is None:
        build_corpus(CorpusConfig.from_dict({"name": "bench"}), work / "corpus")
    else:
        body = text.read_text(encoding="utf-8")
        (work / "input.txt").write_text("\n\n".join([body] * copies), encoding="utf-8")
        files = CorpusConfig.from_dict({"name": "bench", "source": "files", "paths": [str(work / "input.txt")]})
        build_corpus(files, work / "corpus")
    return work / "corpus"


def measure(kind: str, corpus: Path, work: Path, rounds: int, batch_docs: int) -> dict[str, float]:
    trained_cfg = TokenizerConfig.from_dict({"kind": kind, "vocab_size": 512})
    trained = tokenize_corpus(trained_cfg, corpus, work / f"{kind}-trained")
    tokenizer_json = str(work / f"{kind}-trained" / "tokenizer.json")
    stage_cfg = TokenizerConfig.from_dict({"kind": "file", "path": tokenizer_json, "batch_docs": batch_docs})
    docs = [text for split in ("train", "val") for text in iter_texts(corpus / f"{split}.jsonl")]
    megabytes = sum(len(d.encode("utf-8")) for d in docs) / 1e6

    def raw() -> None:
        tokenizer = Tokenizer.from_file(tokenizer_json)  # fresh each round, as in the stage (cold caches)
        tokenizer.encode_special_tokens = True  # as in the stage
        for batch in batched(iter(docs), batch_docs):
            tokenizer.encode_batch_fast(batch, add_special_tokens=False)

    def stage() -> None:
        tokenize_corpus(stage_cfg, corpus, work / f"{kind}-stage")

    fns: dict[str, Callable[[], object]] = {"raw": raw, "stage": stage}
    if kind == "char":
        vocab = Tokenizer.from_file(tokenizer_json).get_vocab()
        unk = vocab["[UNK]"]
        fns["python_dict"] = lambda: [[vocab.get(c, unk) for c in d] for d in docs]
    best = {name: min(times) for name, times in alternating_timings(fns, rounds).items()}
    result = {"megabytes": megabytes, "vocab_size": trained["vocab_size"]}
    result.update({f"{name}_mb_s": megabytes / seconds for name, seconds in best.items()})
    result["ratio"] = result["stage_mb_s"] / result["raw_mb_s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=summary_of(__doc__))
    parser.add_argument("--quick", action="store_true", help="embedded corpus, one round (seconds)")
    parser.add_argument("--text", type=Path, default=TINY_SHAKESPEARE, help="text file to repeat")
    parser.add_argument("--copies", type=int, default=8, help="copies of --text (default 8: ~9 MB)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up; best kept")
    parser.add_argument("--batch-docs", type=int, default=1000)
    add_out_argument(parser)
    args = parse_bench_args(parser, BENCH)
    if not args.quick and not args.text.is_file():
        raise SystemExit(f"bench/tokenize.py: --text {args.text} is not a file (--quick uses the embedded corpus)")
    text = None if args.quick else args.text
    rounds = 1 if args.quick else args.rounds
    rows = []
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpus = build_input(work, text, args.copies)
        label = "embedded pydoc corpus" if text is None else f"{text.name} x{args.copies}"
        for kind in ("char", "bpe"):
            r = measure(kind, corpus, work, rounds, args.batch_docs)
            name = f"{kind}{r['vocab_size']}"
            print(f"{name:>8} on {label} ({r['megabytes']:.2f} MB): stage {r['stage_mb_s']:.2f} MB/s, "
                  f"raw encode_batch_fast {r['raw_mb_s']:.2f} MB/s, ratio {r['ratio']:.3f}"
                  + (f"; python dict {r['python_dict_mb_s']:.2f} MB/s" if "python_dict_mb_s" in r else ""))
            rows += [
                row("tokenize", f"{name}.input", r["megabytes"], "MB"),
                row("tokenize", f"{name}.stage", r["stage_mb_s"], "MB/s"),
                row("tokenize", f"{name}.raw_encode_batch_fast", r["raw_mb_s"], "MB/s"),
                row("tokenize", f"{name}.stage_over_raw", r["ratio"], "x"),
            ]
            if "python_dict_mb_s" in r:
                rows.append(row("tokenize", f"{name}.python_dict", r["python_dict_mb_s"], "MB/s"))
    save_rows(args, BENCH, rows)


if __name__ == "__main__":
    main()

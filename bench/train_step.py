"""One training step of (lipschitz_gpt + muon + spectral_soft_cap) against (gpt + adamw), side by side.

    python bench/train_step.py [--quick] [--shape cpu|gpt2-124m|quick] [--batch-size B] [--vocab V]
                               [--grad-accum A[,A...]] [--rounds R] [--warmup W] [--device auto|cpu|cuda] [--compile]
                               [--threads N] [--no-profile]

Both arms are ``lipflow.train.trainer.Trainer`` objects built from one schema-resolved config that
differs only in what config.yaml's ``baseline`` and ``lipschitz`` runs set (model, optimizer, lr,
weight constraint, logit scale; read from config.yaml), on the same tokenized data. A step is ``Trainer.train_step()``, exactly as
training runs it: sample a batch, forward and backward (bf16 autocast on CUDA), optimizer step,
weight constraint on every matrix, embedding projection. After ``--warmup`` untimed rounds the arms
alternate for ``--rounds`` rounds (order reversed every other round; CUDA synchronized around each
step); each arm's median is kept and ratio = lipschitz / baseline.

FLOPs per step (PaLM, Chowdhery et al. 2022, App. B; nanoGPT's ``estimate_mfu``):
``tokens · (6·N + 12·L·T·d)``, tokens = batch·context·grad_accum, N = the weights that multiply
activations (hidden and head matrices: embedding lookups and vectors do no matmul), and 12·L·T·d
the attention scores QKᵀ and the weighted sum AV (2·2·T·d per token per layer forward, ×3 with
backward, over the full T×T). Causal attention needs only about half of that term, so the formula
overstates the useful FLOPs, and with them MFU, by 6·L·T·d per token: more at long T (7% for
``gpt2-124m``, 4% for ``cpu``); it is the convention PaLM and nanoGPT report. Both arms have the
same N and so the same FLOPs. Optimizer and constraint arithmetic
(Newton–Schulz, the soft cap's matmuls) is not model FLOPs: it shows up as a lower MFU.
MFU = (FLOPs / median step time) / peak, the peak being the best of ``--rounds`` timings of
``PEAK_REPEATS`` back-to-back n×n matmuls (2n³ FLOPs each; n = 2048 on CPU and 8192 on CUDA, with
--quick 512 and 4096) in the same run, fp32 on CPU and bf16 (the autocast dtype) on CUDA. A step whose
loss is not finite stops the benchmark: its steps no longer train a model (the trainer steps on, and
the run would end at its next flush).

Also timed, alternately, on the gradients the last step left: ``optimizer.step()`` alone and the
weight constraint alone (``project_matrices_`` and the embedding projection), which split the
difference between the arms. A timed step reads its loss (one host sync), to check it is finite.
Then (unless ``--no-profile``) one more step of each arm runs under ``torch.profiler``: the self time
of each op (its CUDA kernels' time on a GPU, CPU time on a CPU), printed side by side, largest
difference first, so the forward and backward part of the gap is named op by op; ops with at least
``PROFILE_MIN_SHARE`` of an arm's profiled time are kept as rows.

Tokens per step: batch × context × ``--grad-accum`` micro-batches (config key grad_accum); with
several counts (``--grad-accum 1,30``) the same two arms, compiled graphs included, are timed at each
in turn (rows and table per count; the optimizer and constraint phases, the peak and the profile
once, the profile at the first count). The optimizer and the constraint run once per step whatever
its tokens, so their share of the step, and with it the lipschitz/baseline ratio, falls as the step
grows: GPT-2's own recipe (nanoGPT's train_gpt2) steps every 491,520 tokens, ``--shape gpt2-124m
--grad-accum 30``.

Shapes: ``quick`` (d 64, 2 layers, context 64, batch 8 × 2 micro-batches; the --quick smoke test), ``cpu`` (d 256,
4 layers, context 128, batch 128: 16,384 tokens per step, the tokens per step of Newhouse et al.'s
Shakespeare runs, batch 64 × context 256; the CPU default), ``gpt2-124m`` (GPT-2 small: d 768, 12 layers,
12 heads, context 1024, vocabulary 50257, batch 16; the CUDA default; 124M parameters with GPT-2's
tied embeddings, 163M with lipflow's untied head, of which N = 123.5M multiply activations). The
small shapes train on the default config's data (embedded pydoc corpus, char tokenizer);
``gpt2-124m`` on random words of a word-level tokenizer.json with exactly 50257 ids, passed through
the real corpus and tokenize stages (step time does not depend on the text).

``--vocab V`` trains any shape on such random words of V ids instead.

Rows go to results/bench/train_step.parquet (--quick: results/bench/quick/); metric names start
with ``<shape>.B<batch>`` (``<shape>.B<batch>x<grad_accum>`` when a step has several micro-batches; then
``.V<vocab>`` with --vocab and ``.compiled`` with --compile).
"""

from __future__ import annotations

import os
import sys

# Run as a script, this file's directory would come first on sys.path, where bench/tokenize.py
# shadows the standard library's ``tokenize`` (imported by torch): put the repo root there instead.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(_HERE)] + [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Iterable  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import (add_out_argument, add_torch_arguments, alternating_timings,  # noqa: E402
                          default_runs, default_shards, parse_bench_args, print_table, row, run_configs,
                          save_rows, synchronize, torch_setup)
from lipflow.errors import count_argument, summary_of  # noqa: E402
from lipflow.train.trainer import Trainer  # noqa: E402
from lipflow.train.update import project_matrices_  # noqa: E402

BENCH = "train_step"

# name → run settings (+ "vocab": None for the default char data, or a synthetic vocabulary size)
SHAPES: dict[str, dict[str, Any]] = {
    "quick": {"d_model": 64, "n_layers": 2, "n_heads": 4, "context": 64, "batch_size": 8, "grad_accum": 2,
              "vocab": None},
    "cpu": {"d_model": 256, "n_layers": 4, "n_heads": 4, "context": 128, "batch_size": 128, "vocab": None},
    "gpt2-124m": {"d_model": 768, "n_layers": 12, "n_heads": 12, "context": 1024, "batch_size": 16,
                  "vocab": 50257},
}

MATMUL_SIZE = {"cpu": 2048, "cuda": 8192}  # n of the n×n peak matmul
MATMUL_SIZE_QUICK = {"cpu": 512, "cuda": 4096}  # a small matmul on a GPU times its launch, not its math
PEAK_REPEATS = 10  # matmuls per timing, so one synchronize does not weigh on the peak
SYNTHETIC_TRAIN_TOKENS = 200_000
PROFILE_MIN_SHARE = 0.01  # an op's share of its arm's profiled time for a row
PROFILE_PRINTED = 15  # ops in the printed side-by-side profile


def synthetic_vocab_shards(work: Path, vocab_size: int) -> Path:
    """Token shards with exactly ``vocab_size`` ids: a word-level tokenizer.json over words w2 … w(V−1)
    (id 0 = <|endoftext|>, 1 = [UNK]) and a JSONL corpus of uniformly random such words, through the
    corpus and tokenize stages (kind ``file``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from lipflow.data.corpus import CorpusConfig, build_corpus
    from lipflow.data.tokenize import EOT, UNK, TokenizerConfig, tokenize_corpus

    vocab = {EOT: 0, UNK: 1, **{f"w{i}": i for i in range(2, vocab_size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens([EOT])
    tokenizer.save(str(work / "words.json"))
    rng = np.random.default_rng(0)
    docs = rng.integers(2, vocab_size, size=(SYNTHETIC_TRAIN_TOKENS // 1000, 1000))
    with open(work / "words.jsonl", "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": " ".join(f"w{i}" for i in doc)}) + "\n")
    corpus = CorpusConfig.from_dict({"name": "words", "source": "jsonl", "paths": [str(work / "words.jsonl")]})
    build_corpus(corpus, work / "corpus")
    tokenizer_cfg = TokenizerConfig.from_dict({"kind": "file", "path": str(work / "words.json")})
    tokenize_corpus(tokenizer_cfg, work / "corpus", work / "words")
    return work / "words"


def matmul_peak(n: int, device: torch.device, rounds: int) -> float:
    """Best FLOP/s of ``PEAK_REPEATS`` n×n @ n×n matmuls (2n³ FLOPs each): fp32 on CPU, bf16 on CUDA."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=gen).to(device, dtype) for _ in range(2))
    out = torch.empty(n, n, device=device, dtype=dtype)

    def matmuls() -> None:
        for _ in range(PEAK_REPEATS):
            torch.matmul(a, b, out=out)

    times = alternating_timings({"matmul": matmuls}, rounds, warmup=1, device=str(device))["matmul"]
    return PEAK_REPEATS * 2 * n**3 / min(times)


def finite_step(trainer: Trainer) -> Callable[[], float]:
    """``trainer.train_step``, raising on a non-finite loss (the arm no longer trains a model)."""
    def step() -> float:
        loss = float(trainer.train_step().loss)
        if not math.isfinite(loss):
            raise SystemExit(f"train_step: arm {trainer.run_id} reached a non-finite loss ({loss}); "
                             "its steps no longer train a model")
        return loss
    return step


def matmul_weights(trainer: Trainer) -> int:
    """N: parameters of the hidden and head matrices (the weights that multiply activations)."""
    roles = trainer.model.param_roles()
    return sum(p.numel() for _, p in roles["hidden"] + roles["head"])


def flops_per_step(cfg: dict[str, Any], n_matmul: int) -> float:
    """tokens · (6·N + 12·L·T·d) (PaLM App. B): weight matmuls plus attention scores and values."""
    tokens = cfg["batch_size"] * cfg["context"] * cfg["grad_accum"]
    return tokens * (6 * n_matmul + 12 * cfg["n_layers"] * cfg["context"] * cfg["d_model"])


# Profiler ranges → phase of a step: torch's own range around every optimizer.step(), and the ranges
# Trainer.train_step and project_matrices_ open; ops in none of them (gradient norm, embedding
# projection) are "other".
PHASE_RANGES = (("Optimizer.step#", "optimizer"), ("weight_constraint", "constraint"),
                ("forward_backward", "forward_backward"))


def op_self_times(step: Callable[[], object], device: torch.device) -> dict[str, float]:
    """``phase_times`` of one ``step`` under ``torch.profiler`` (with CUDA activity on a GPU)."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])) as prof:
        step()
        synchronize(str(device))
    return phase_times(prof.events(), on_gpu)


def phase_times(events: Iterable[Any], on_gpu: bool) -> dict[str, float]:
    """Self time in seconds of each op among profiler ``events``, keyed "phase: op": the time of the op's
    own CUDA kernels on a GPU, its own CPU time on a CPU; ops that took none are left out.

    Only host-side events count: on a GPU the profiler also lists each kernel, and a device-side copy of
    each range, as events of their own, whose time the op that launched them already holds (and whose
    timestamps run behind the host's). An op's phase is that of the innermost ``PHASE_RANGES`` range
    whose wall-clock span holds the op's start: by time, not by the call stack, because on a GPU the
    backward pass runs on autograd's device thread, whose ops have no parent among the ranges of the
    thread that called ``backward()``."""
    from torch.autograd import DeviceType

    host = [e for e in events if e.device_type == DeviceType.CPU and not e.is_async]
    spans = sorted(((e.time_range.start, e.time_range.end, phase) for e in host
                    for prefix, phase in PHASE_RANGES if e.name.startswith(prefix)), key=lambda s: s[1] - s[0])
    times: dict[str, float] = defaultdict(float)
    for event in host:
        t = event.self_device_time_total if on_gpu else event.self_cpu_time_total
        if t > 0:  # on a CPU, a range's own time is the Python between its ops
            phase = next((p for start, end, p in spans if start <= event.time_range.start < end), "other")
            times[f"{phase}: {event.name}"] += t / 1e6
    return dict(times)


def profile_rows(profiles: dict[str, dict[str, float]], metric: str, dev: str) -> list[dict[str, Any]]:
    """Print the arms' op self times side by side (largest |lipschitz − baseline| first) and return a row per
    op with at least ``PROFILE_MIN_SHARE`` of its arm's profiled time, plus each arm's total and its total per
    phase."""
    totals = {name: sum(ops.values()) for name, ops in profiles.items()}
    if not all(totals.values()):
        raise SystemExit("train_step: the profiler recorded no op times (on CUDA: is CUPTI missing?)")
    base, lip = profiles["baseline"], profiles["lipschitz"]
    ops = sorted(base.keys() | lip.keys(), key=lambda k: -abs(lip.get(k, 0.0) - base.get(k, 0.0)))
    print(f"one profiled step, self time per op ({'CUDA kernels' if dev.startswith('cuda') else 'CPU'}), "
          f"largest difference first ({PROFILE_PRINTED} of {len(ops)} ops):")
    print_table(["op", "baseline ms", "lipschitz ms", "difference ms"],
                [[k, base.get(k, 0.0) * 1e3, lip.get(k, 0.0) * 1e3, (lip.get(k, 0.0) - base.get(k, 0.0)) * 1e3]
                 for k in ops[:PROFILE_PRINTED]]
                + [["all ops", totals["baseline"] * 1e3, totals["lipschitz"] * 1e3,
                    (totals["lipschitz"] - totals["baseline"]) * 1e3]])
    rows = []
    for name, arm_ops in profiles.items():
        rows.append(row(BENCH, f"{metric}.{name}.profiled_time", totals[name], "s", dev))
        phases: dict[str, float] = defaultdict(float)
        for op, t in arm_ops.items():
            phases[op.split(": ", 1)[0]] += t
        rows += [row(BENCH, f"{metric}.{name}.profiled_time.{phase}", t, "s", dev) for phase, t in phases.items()]
        rows += [row(BENCH, f"{metric}.{name}.op_self_time.{op}", t, "s", dev)
                 for op, t in arm_ops.items() if t >= PROFILE_MIN_SHARE * totals[name]]
    return rows


def accumulation_counts(text: str) -> list[int]:
    """--grad-accum: micro-batches per optimizer step, one count or several separated by commas."""
    counts = text.split(",")
    if not all(c.isdigit() and int(c) >= 1 for c in counts):
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of integers ≥ 1")
    if len({int(c) for c in counts}) < len(counts):
        raise argparse.ArgumentTypeError(f"'{text}' repeats a count")
    return [int(c) for c in counts]


def use_grad_accum(trainers: dict[str, Trainer], count: int) -> None:
    """Make every arm's next steps take ``count`` micro-batches (the trainer reads its config each step):
    the same models, optimizers and compiled graphs at another number of tokens per step."""
    for t in trainers.values():
        t.cfg["grad_accum"] = count


def phase_timings(trainers: dict[str, Trainer], rounds: int, device: torch.device) -> dict[str, list[float]]:
    """``optimizer.step()`` alone and the weight constraint alone (``project_matrices_`` and the embedding
    projection) of each arm, alternating, on the gradients the last step left."""
    phases: dict[str, Callable[[], object]] = {}
    for name, t in trainers.items():
        phases[f"{name}.optimizer"] = t.optimizer.step
        phases[f"{name}.constraint"] = lambda t=t: (project_matrices_(t.optimizer, t.matrices, t.constraint, {}),
                                                    t.model.project_embeddings())
    return alternating_timings(phases, rounds, warmup=1, device=str(device))


def step_metric(shape_name: str, cfg: dict[str, Any], vocab: int | None) -> str:
    """``<shape>.B<batch>[x<grad_accum>][.V<vocab>][.compiled]``: the prefix of a measurement's rows."""
    return (f"{shape_name}.B{cfg['batch_size']}" + (f"x{cfg['grad_accum']}" if cfg["grad_accum"] > 1 else "")
            + (f".V{vocab}" if vocab else "") + (".compiled" if cfg["compile"] else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=summary_of(__doc__))
    parser.add_argument("--quick", action="store_true", help="shape 'quick', 3 rounds, small peak matmul (seconds)")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="default: cpu on CPU, gpt2-124m on CUDA")
    parser.add_argument("--batch-size", type=count_argument(1), help="override the shape's batch size")
    parser.add_argument("--vocab", type=count_argument(3),  # ids 0, 1: end-of-text, unknown; words need one more
                        help="a synthetic vocabulary of this many ids (≥ 3) instead of the shape's (as gpt2-124m's; "
                             "the loss over the vocabulary grows with it)")
    parser.add_argument("--grad-accum", type=accumulation_counts,
                        help="micro-batches per optimizer step (default: the shape's, 1 but for quick); several, "
                             "e.g. 1,30, time the same arms (and compiled graphs) at each")
    parser.add_argument("--rounds", type=count_argument(1), default=10, help="timed rounds per arm (median kept)")
    parser.add_argument("--warmup", type=count_argument(0), default=2, help="untimed rounds first")
    add_torch_arguments(parser)
    parser.add_argument("--compile", action="store_true", help="torch.compile both models (config key compile)")
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True,
                        help="profile one more step of each arm, op by op (default: on)")
    add_out_argument(parser)
    args = parse_bench_args(parser, BENCH, argv)
    device, dev = torch_setup(args)
    shape_name = args.shape or ("quick" if args.quick else "gpt2-124m" if device.type == "cuda" else "cpu")
    shape = dict(SHAPES[shape_name])
    vocab = shape.pop("vocab")
    if args.vocab:
        vocab = args.vocab
    if args.batch_size:
        shape["batch_size"] = args.batch_size
    if args.grad_accum:
        shape["grad_accum"] = args.grad_accum[0]
    rounds, warmup = (3, 1) if args.quick else (args.rounds, args.warmup)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = default_shards(work) if vocab is None else synthetic_vocab_shards(work, vocab)
        configs = run_configs({**shape, "device": args.device, "compile": args.compile}, default_runs())
        trainers = {name: Trainer(name, cfg, data, work / "runs" / name, progress=False)
                    for name, cfg in configs.items()}
        n_peak = (MATMUL_SIZE_QUICK if args.quick else MATMUL_SIZE)[device.type]
        counts = args.grad_accum or [configs["baseline"]["grad_accum"]]
        rows = [row(BENCH, "torch_threads", torch.get_num_threads(), "threads", dev)]
        for accum in counts:
            use_grad_accum(trainers, accum)
            times = alternating_timings({name: finite_step(t) for name, t in trainers.items()}, rounds, warmup,
                                        str(device))
            if accum == counts[0]:  # once, on the gradients the first timed steps left
                phase_times = phase_timings(trainers, rounds, device)
                peak = matmul_peak(n_peak, device, rounds)
            cfg = trainers["baseline"].cfg  # the config use_grad_accum set
            tokens = cfg["batch_size"] * cfg["context"] * accum
            metric = step_metric(shape_name, cfg, args.vocab)
            arm_table = []
            for name, t in trainers.items():
                step_s = statistics.median(times[name])
                flops = flops_per_step(t.cfg, matmul_weights(t))
                opt_s = statistics.median(phase_times[f"{name}.optimizer"])
                con_s = statistics.median(phase_times[f"{name}.constraint"])
                n_params = sum(p.numel() for p in t.model.parameters())
                achieved = flops / step_s
                arm_table.append([f"{t.cfg['model']}+{t.cfg['optimizer']}+{t.cfg['weight_constraint']}",
                                  f"{n_params / 1e6:.2f}M", step_s * 1e3, opt_s * 1e3, con_s * 1e3,
                                  tokens / step_s, achieved / 1e9, 100 * achieved / peak])
                rows += [row(BENCH, f"{metric}.{name}.step_time", step_s, "s", dev),
                         row(BENCH, f"{metric}.{name}.optimizer_step_time", opt_s, "s", dev),
                         row(BENCH, f"{metric}.{name}.constraint_time", con_s, "s", dev),
                         row(BENCH, f"{metric}.{name}.tokens_per_s", tokens / step_s, "tokens/s", dev),
                         row(BENCH, f"{metric}.{name}.flops_per_step", flops, "FLOP", dev),
                         row(BENCH, f"{metric}.{name}.achieved_flops", achieved, "FLOP/s", dev),
                         row(BENCH, f"{metric}.{name}.mfu", achieved / peak, "fraction", dev),
                         row(BENCH, f"{metric}.{name}.n_params", n_params, "parameters", dev),
                         row(BENCH, f"{metric}.{name}.vocab_size", t.train_data.vocab_size, "tokens", dev)]
            ratio = statistics.median(times["lipschitz"]) / statistics.median(times["baseline"])
            rows += [row(BENCH, f"{metric}.lipschitz_over_baseline", ratio, "x", dev),
                     row(BENCH, f"{metric}.matmul_peak", peak, "FLOP/s", dev)]
            print(f"shape {shape_name}: d_model {cfg['d_model']}, {cfg['n_layers']} layers, {cfg['n_heads']} heads, "
                  f"context {cfg['context']}, batch {cfg['batch_size']} × {accum} micro-batches, "
                  f"vocab {trainers['baseline'].train_data.vocab_size}; {tokens} tokens/step; median of {rounds} "
                  f"alternating rounds after {warmup} warmup")
            print_table(["arm", "params", "step ms", "optimizer ms", "constraint ms", "tokens/s", "GFLOP/s",
                         "MFU %"], arm_table)
            print(f"step time ratio lipschitz/baseline: {ratio:.3f}x; matmul peak ({n_peak}², "
                  f"{'bf16' if device.type == 'cuda' else 'fp32'}): {peak / 1e9:.1f} GFLOP/s")
            save_rows(args, BENCH, rows)  # each count's rows as soon as it is timed: a later one may time out
            rows = []
        # the timing rows are saved first: a profiler that fails on this machine costs only its own rows
        if args.profile:
            use_grad_accum(trainers, counts[0])
            profiles = {name: op_self_times(finite_step(t), device) for name, t in trainers.items()}
            metric = step_metric(shape_name, trainers["baseline"].cfg, args.vocab)
            save_rows(args, BENCH, profile_rows(profiles, metric, dev))
    return 0


if __name__ == "__main__":
    sys.exit(main())

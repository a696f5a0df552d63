"""The reference Shakespeare recipe at full size, trained by lipflow's Trainer (no Snakemake): the
constrained GPT as the reference notebook trains it, at σ_max 2 and 6, and the unconstrained GPT
baseline (on request also the preprint's App. D setting at σ_max 2), on Tiny Shakespeare characters.

    python bench/reference_recipe.py [--text FILE] [--steps N] [--arms ARM ...] [--device auto|cpu|cuda]
        [--quick]

Arms. ``notebook.s6`` is experiments/reference.yaml's run ``reference`` as it stands: the Shakespeare
config of the code released with Newhouse et al. 2025 (Arongil/lipschitz-transformers @ 158692e,
experiment.ipynb): d 256, 3 blocks, 4 heads, context 256, batch 512, 2000 steps, Muon at lr 0.1 with
linear decay and the reference's Muon options, modular-norm step sizes (blocks mass 16), spectral
soft cap at σ_max 6. ``notebook.s2``: the same at σ_max 2. ``appendix.s2``: the same with the batch
and blocks mass of the 2025-07-15 preprint's App. D Shakespeare sweep (64 and 32; the notebook's lr
0.1 and 2000 steps, so 8× fewer tokens) at σ_max 2, the bound of the arXiv abstract's "60 % val
accuracy"; run only when named in --arms. ``baseline``: config.yaml's ``baseline`` run (pre-LayerNorm
GPT + AdamW) at the notebook's shape and budget. Every arm evaluates every 500 steps (on the
recipe's eval_batches × batch val windows, 20 × 512) and writes no checkpoints. Data: the corpus and
tokenize stages on ``--text`` (default ../shared/data/tinyshakespeare.txt beside the repository),
character tokenizer, 10% of the documents held out. Reported per run: final val loss and accuracy
(the trainer's fixed val windows), the certified ∞RMS Lipschitz bound, max activation, wall time
and tokens/s of training; where the GPU has fp8 tensor cores (compute capability ≥ 8.9), also val
loss and accuracy with every Linear through the real e4m3 kernel (``torch._scaled_mm``) against the
same arithmetic simulated in fp32 (``lipflow.evaluation.precision.real_fp8_accuracy``, 256 val
windows; scale 1 where the activation bounds prove e4m3 safe, per-tensor scaling otherwise).
``--quick``: 20 steps at d 64, context 64, batch 16 for every arm (a smoke test).
Rows go to results/bench/reference_recipe.parquet (--quick: results/bench/quick/), each arm's as soon as
it is done (a time limit that stops a later arm keeps them).
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(_HERE)] + [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from bench.common import (REPO, add_out_argument, default_shards, device_label, machine, parse_bench_args,  # noqa: E402
                          print_table, reference_run, row, run_configs, save_rows)
from lipflow.config import load_config_file  # noqa: E402
from lipflow.errors import summary_of  # noqa: E402
from lipflow.evaluation.precision import fp8_kernel_available, real_fp8_accuracy  # noqa: E402
from lipflow.metrics import resolve_device  # noqa: E402
from lipflow.train.trainer import Trainer  # noqa: E402

BENCH = "reference_recipe"
DEFAULT_TEXT = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
# Newhouse et al., preprint of 2025-07-15, App. D: the Shakespeare sweep's batch and blocks mass.
APPENDIX_D = {"batch_size": 64, "masses": {"embed": 1.0, "blocks": 32.0, "head": 1.0}}
SHAPE_KEYS = ("d_model", "n_layers", "n_heads", "context", "mlp_ratio", "batch_size", "grad_accum", "steps",
              "schedule", "warmup_steps", "eval_batches", "seed")
BENCH_SETTINGS = {"eval_every": 500, "checkpoint_every": 0}
DEFAULT_ARMS = ["notebook.s2", "notebook.s6", "baseline"]
QUICK = {"d_model": 64, "context": 64, "batch_size": 16, "steps": 20, "eval_every": 10}


def arms() -> dict[str, dict]:
    """Arm name → run overrides: the recipe's run and config.yaml's baseline at the recipe's shape."""
    reference = reference_run()
    baseline = load_config_file(REPO / "config.yaml")["runs"]["baseline"]
    return {"notebook.s2": {**reference, "sigma_max": 2.0},
            "notebook.s6": reference,
            "appendix.s2": {**reference, **APPENDIX_D, "sigma_max": 2.0},
            "baseline": {**baseline, **{key: reference[key] for key in SHAPE_KEYS}}}


def arm_configs(names: list[str], device: str, quick: bool = False, steps: int | None = None) -> dict[str, dict]:
    """Arm name → validated run config: the arm, then the bench's settings (evaluation every 500 steps,
    no checkpoints; ``quick``: the smoke-test shape; ``steps``: fewer or more steps)."""
    settings = {**BENCH_SETTINGS, **(QUICK if quick else {}), "device": device}
    if steps is not None:
        settings.update(steps=steps, eval_every=min(settings["eval_every"], steps))
    recipe = arms()
    return run_configs({}, {name: {**recipe[name], **settings} for name in names})


def shakespeare_shards(text: Path, work: Path) -> Path:
    if not text.is_file():
        raise SystemExit(f"reference_recipe: --text {text} not found (Tiny Shakespeare, 1,115,394 characters)")
    return default_shards(work, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=summary_of(__doc__))
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--steps", type=int, help="override the recipe's steps (say so when reporting)")
    parser.add_argument("--arms", nargs="+", choices=list(arms()), default=DEFAULT_ARMS)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="20 steps of a small shape (smoke test)")
    add_out_argument(parser)
    args = parse_bench_args(parser, BENCH, argv)
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    device = resolve_device(args.device)
    dev = device_label(str(device))
    print(f"machine: {machine()}; device: {dev}")
    table, fp8_table = [], []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = shakespeare_shards(args.text, work)
        configs = arm_configs(args.arms, args.device, args.quick, args.steps)
        for name, cfg in configs.items():
            trainer = Trainer(name, cfg, data, work / "runs" / name, progress=False)
            start = time.perf_counter()
            summary = trainer.run()
            wall = time.perf_counter() - start
            tokens = cfg["steps"] * cfg["batch_size"] * cfg["context"] * cfg["grad_accum"]
            metric = f"d{cfg['d_model']}.L{cfg['n_layers']}.T{cfg['context']}.B{cfg['batch_size']}.S{cfg['steps']}.{name}"
            values = {"val_loss": (summary["final_val_loss"], "nats"),
                      "val_accuracy": (summary["final_val_accuracy"], "fraction"),
                      "lipschitz_bound": (summary["lipschitz_bound"], "ratio"),
                      "max_activation": (summary["max_activation"], "abs"),
                      "wall_time": (wall, "s"), "tokens_per_s": (tokens / wall, "tokens/s")}
            # each arm's rows once it is trained: a later arm (or this arm's fp8 check) may be cut off by a time limit
            save_rows(args, BENCH, [row(BENCH, f"{metric}.{key}", value, unit, dev)
                                    for key, (value, unit) in values.items() if value is not None])
            table.append([name, cfg["batch_size"], summary["status"], summary["final_val_loss"],
                          100 * summary["final_val_accuracy"],
                          summary["lipschitz_bound"] if summary["lipschitz_bound"] is not None else "none",
                          summary["max_activation"], wall, tokens / wall])
            if fp8_kernel_available(device):
                trainer.model.eval()
                fp8 = real_fp8_accuracy(trainer.model, trainer.val_data.sequential_windows(cfg["context"], 256))
                fp8_table.append([name, fp8["scaling"], fp8["proven_safe"], fp8["fp32_loss"], fp8["simulated_loss"],
                                  fp8["real_loss"], 100 * fp8["fp32_accuracy"], 100 * fp8["simulated_accuracy"],
                                  100 * fp8["real_accuracy"], fp8["max_logit_difference"]])
                save_rows(args, BENCH, [row(BENCH, f"{metric}.fp8_e4m3.{key}", value,
                                            "nats" if "loss" in key else "fraction", dev)
                                        for key, value in fp8.items() if key.endswith(("_loss", "_accuracy"))])
            del trainer
            if device.type == "cuda":
                torch.cuda.empty_cache()
    cfg = next(iter(configs.values()))
    print(f"d_model {cfg['d_model']}, {cfg['n_layers']} blocks, {cfg['n_heads']} heads, context {cfg['context']}, "
          f"{cfg['steps']} steps, linear decay; Tiny Shakespeare characters")
    print_table(["run", "batch", "status", "val loss", "val acc %", "certified L (∞RMS)", "max act", "wall s",
                 "tokens/s"], table)
    if fp8_table:
        print("every Linear in e4m3 (real kernel torch._scaled_mm vs fp32 simulation), 256 val windows:")
        print_table(["run", "scaling", "proven safe", "fp32 loss", "sim loss", "real loss", "fp32 acc %",
                     "sim acc %", "real acc %", "max |Δlogit|"], fp8_table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

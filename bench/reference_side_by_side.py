"""Side by side: the reference code (Arongil/lipschitz-transformers, JAX + Modula) and lipflow's Trainer.

    python bench/reference_side_by_side.py --reference DIR [--full] [--steps N] [--points P ...]
        [--threads N] [--data FILE] [--venv DIR] [--max-val-windows N] [--quick] [--out FILE]

DIR is a checkout of Arongil/lipschitz-transformers at 158692e; this script never downloads it:
    git clone https://github.com/Arongil/lipschitz-transformers DIR && git -C DIR checkout 158692e
The reference runs from its own modules (``models.create_model``, ``optimizers.get_optimizer``,
``trainer.Trainer``, imported from DIR) in a subprocess: with this interpreter when it imports jax,
else with the one in ``--venv`` (default <tmp>/lipflow-reference-jax), which is created with
``pip install jax numpy`` (CPU wheels) when it does not import jax either. Two reference functions
are read out of their files by name, so the files' other imports (requests, psutil) are not needed:
``cross_entropy_loss`` (data/shakespeare.py) and ``calculate_lipschitz_constant`` (utils.py).

Data, identical for both: the reference's own preparation (data/shakespeare.py): sorted distinct
characters → ids 0…64, the first 90% of the text train, the rest val. lipflow reads token shards
written from the same arrays (vocabulary 65, no end-of-text id). Both see the same batches: the
window starts are lipflow's (``TokenShards.sample_starts`` draws from a torch generator seeded with
the run seed; this script draws them the same way up front, hands them to the reference's Trainer
as its loader, and checks lipflow drew the same). Both are scored on the same windows: every
non-overlapping val window (``TokenShards.sequential_windows``), mean loss per token (nats) and
next-token accuracy at every position.

Settings: cpu: d 128, 2 blocks, 4 heads, seq 64, batch 64, 1000 steps. --full: experiment.ipynb's
``shakespeare_gpt_muon_constrained`` (d 256, 3 blocks, 4 heads, seq 256, batch 512, 2000 steps).
Both: lr 0.1, masses embed 1 / blocks 16 / head 1, linear decay to 0, no weight decay, softmax scale 1,
GELU/1.1289, fp32 weights. Points: Muon + spectral soft cap at σ_max 2 and 6, and Muon without a
constraint. Reference config: the notebook's keys (project soft_cap|none, w_max, post_dualize,
max_embed_inflation_factor 16, use_unembed False, zero_init True, β1 0.9). lipflow config:
experiments/reference.yaml's run at the setting's shape (lipschitz_gpt, parametrization modular,
optimizer muon with momentum 0.9 and the reference's Muon options: nesterov false, ns_coefficients
you with 6 steps, embed_optimizer dualized with max_embed_inflation 16), weight_constraint
spectral_soft_cap|none. What lipflow still does differently: the head starts orthogonal (the
reference: zero); on CUDA bf16 autocast (the reference: fp32 weights and JAX's default matmul
precision). And one the other way: the reference's Linear.project couples the soft cap to lr·t/s,
s = √(fan_out/fan_in), though the step's norm on W/s is lr·t, so its MLP up-projection (s = 2) can
settle above σ_max (at σ_max 2 the scalar worst case is 2.293; lipflow couples to the step's own
bound).

Bounds, for each trained model and from its final weights: lipflow's ``lipschitz_bound()`` (∞RMS,
embedded sequence → logits, attention per head) and the reference's ``calculate_lipschitz_constant``
on the norms its ``Linear.log``/``Embed.log`` record (RMS→RMS σ_max·√(fan_in/fan_out); embedding
max column RMS). The reference formula (post-16cccff) is multiplicative: L ← (1−α)L + α·L·L_block
through each residual, starting at the embedding's norm and ending × the head's norm.
tokens/s: training tokens over the wall time from step 5 to the start of the last step (JIT
compilation, CUDA warm-up and the final evaluation excluded), each implementation alone.

Prints a Markdown table (each point's two rows when it finishes, then all); rows are appended to
results/bench/reference_side_by_side.parquet after each point (--quick: 20 steps, results/bench/quick/).
Needs torch, jax (or pip to make the venv), numpy, pyarrow, tokenizers, safetensors, tqdm, pyyaml
and jsonschema (lipflow's config validator); no snakemake, no DuckDB. The data file and DIR are read
from the given paths (--data defaults to ../shared/data/tinyshakespeare.txt beside the repo).
"""

from __future__ import annotations

import os
import sys

# Run as a script, this file's directory would come first on sys.path, where bench/tokenize.py
# shadows the standard library's ``tokenize`` (imported by torch and jax): put the repo root there.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(_HERE)] + [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import argparse  # noqa: E402
import ast  # noqa: E402
import datetime  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import numpy as np  # noqa: E402

from lipflow.errors import summary_of  # noqa: E402

BENCH = "reference_side_by_side"
REFERENCE_COMMIT = "158692e"
REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
WARMUP_STEPS = 5
SETTINGS = {
    "cpu": {"d_model": 128, "n_layers": 2, "n_heads": 4, "context": 64, "batch_size": 64, "steps": 1000},
    "full": {"d_model": 256, "n_layers": 3, "n_heads": 4, "context": 256, "batch_size": 512, "steps": 2000},
}
# point → (reference ``project``, w_max; lipflow weight_constraint, sigma_max)
POINTS = {
    "soft_cap_2": ("soft_cap", 2.0, "spectral_soft_cap", 2.0),
    "soft_cap_6": ("soft_cap", 6.0, "spectral_soft_cap", 6.0),
    "muon": ("none", 1.0, "none", 1.0),
}


# ----------------------------------------------------------------------------- data (both sides)


def reference_split(text: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """data/shakespeare.py's preparation: sorted characters → ids, first 90% train, rest val."""
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    cut = int(len(text) * 0.9)
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    return chars, ids[:cut], ids[cut:]


def val_windows(val: np.ndarray, context: int, max_windows: int | None) -> np.ndarray:
    """Windows i = val[i·T : i·T + T + 1] (TokenShards.sequential_windows), shape (N, T + 1) int64."""
    count = (len(val) - 1) // context
    if max_windows is not None:
        count = min(count, max_windows)
    body = val[: count * context + 1].astype(np.int64)
    return np.ascontiguousarray(np.lib.stride_tricks.sliding_window_view(body, context + 1)[::context])


def train_starts(n_tokens: int, context: int, batch: int, steps: int, seed: int) -> np.ndarray:
    """Every step's window starts as lipflow's Trainer draws them (one generator seeded with the run
    seed, ``torch.randint(0, n − T, (B,))`` per step), shape (steps, B)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return np.stack([torch.randint(0, n_tokens - context, (batch,), generator=generator).numpy()
                     for _ in range(steps)])


def write_shards(chars: list[str], train: np.ndarray, val: np.ndarray, out: Path) -> Path:
    """lipflow token shards (lipflow.data.tokenize's format) holding exactly these ids: a character
    tokenizer whose id i is chars[i], one shard per split, no end-of-text id (the reference has none)."""
    from tokenizers import Tokenizer, decoders, models

    from lipflow.atomic import sha256_file, write_json_atomic
    from lipflow.data.tokenize import MANIFEST_FORMAT, ShardWriter

    out.mkdir(parents=True)
    tokenizer = Tokenizer(models.BPE({c: i for i, c in enumerate(chars)}, []))
    tokenizer.decoder = decoders.Fuse()
    tokenizer.save(str(out / "tokenizer.json"))
    splits = {}
    for split, ids in (("train", train), ("val", val)):
        writer = ShardWriter(out, split, len(ids), ids.dtype)
        writer.add(ids)
        shards = writer.close()
        splits[split] = {"num_docs": 1, "num_tokens": len(ids), "bytes": len(ids), "shards": shards}
    write_json_atomic(out / "manifest.json", {
        "format": MANIFEST_FORMAT, "dtype": train.dtype.name, "vocab_size": len(chars),
        "eot_token": None, "eot_id": None, "shard_tokens": len(train),
        "tokenizer": {"file": "tokenizer.json", "sha256": sha256_file(out / "tokenizer.json"), "kind": "char",
                      "config": {"kind": "char"}},
        "corpus": {"name": "tinyshakespeare-reference-split", "source": {"split": "first 90% / last 10%"}},
        "splits": splits})
    return out


def reference_function(path: Path, name: str, namespace: dict[str, Any]) -> Callable:
    """The top-level function ``name`` of the Python file ``path``, compiled on its own in ``namespace``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    node = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name), None)
    if node is None:
        raise SystemExit(f"{path} has no function {name}: is the reference checkout at {REFERENCE_COMMIT}?")
    exec(compile(ast.Module([node], type_ignores=[]), str(path), "exec"), namespace)
    return namespace[name]


# ----------------------------------------------------------------------------- reference worker (jax only)

# reference tracker → lipflow parameter name ({i}: block index)
TRACKERS = {"q": "attn.q", "k": "attn.k", "v": "attn.v", "w": "attn.o", "mlp_in": "mlp.up", "mlp_out": "mlp.down"}


def lipflow_name(tracker: str) -> str:
    if tracker == "embed":
        return "tok.weight"
    if tracker == "out":
        return "head.weight"
    stem = tracker.rstrip("0123456789")
    return f"blocks.{tracker[len(stem):]}.{TRACKERS[stem]}.weight"


def reference_atoms(module) -> list:
    """Modula atoms in weight-list order (CompositeModule and TupleModule initialize children in order)."""
    if module.atoms == 0:
        return []
    if not module.children:
        return [module]
    return [a for child in module.children for a in reference_atoms(child)]


def clear_rope_caches(module) -> None:
    """Forget modula's Rope sin/cos caches: Rope.get_cached keeps the arrays of the trace that made
    them on the Python object, and a later trace of another shape that reuses them fails with
    UnexpectedTracerError (the JIT hazard the Ocean-Moist fork sidesteps with jit=False)."""
    if hasattr(module, "seq_len_cached"):
        module.seq_len_cached = None
    for child in module.children:
        clear_rope_caches(child)


class StartsLoader:
    """The reference Trainer's train loader: batch k is the windows at starts[k]; records the wall
    time at which each batch is handed out."""

    def __init__(self, tokens: np.ndarray, starts: np.ndarray, context: int):
        self.tokens, self.starts, self.context = tokens, starts, context
        self.times: list[float] = []

    def __iter__(self):
        import jax.numpy as jnp

        offsets = np.arange(self.context + 1)
        for starts in self.starts:
            windows = self.tokens[starts[:, None] + offsets].astype(np.int32)
            self.times.append(time.perf_counter())
            yield jnp.asarray(windows[:, :-1]), jnp.asarray(windows[:, 1:])


class FinalLog:
    """The reference Trainer's logger: keeps the last training log (the weight norms by tracker)."""

    def log_training(self, step, loss, accuracy, log):
        self.loss, self.log = float(loss), log

    def log_validation(self, step, metrics):
        raise AssertionError("validation is run by this script, not by the reference Trainer")


def reference_worker(spec_path: Path) -> None:
    """Train the reference GPT as its notebook does; write final weights (lipflow names) and metrics."""
    spec = json.loads(spec_path.read_text())
    reference = Path(spec["reference"])
    sys.path.insert(0, str(reference))
    import jax
    import jax.numpy as jnp

    from configs import parse_config_from_json
    from models import create_model
    from optimizers import get_optimizer
    from trainer import Trainer

    loss_fn = reference_function(reference / "data" / "shakespeare.py", "cross_entropy_loss", {"jax": jax, "jnp": jnp})
    data = np.load(spec["data"])
    config = parse_config_from_json(spec["config"])
    model = create_model(config)
    model.jit()
    optimizer = get_optimizer(config)
    key = jax.random.PRNGKey(spec["seed"])
    key, subkey = jax.random.split(key)
    params = model.initialize(subkey)
    loader = StartsLoader(data["train"], data["starts"], config.seq_len)
    logger = FinalLog()
    trainer = Trainer(model, optimizer, loader, [], loss_fn, config, logger)
    params, _, _ = trainer.train(params, optimizer.init_state(params), key)
    jax.block_until_ready(params)
    times = loader.times
    tokens = (len(times) - 1 - WARMUP_STEPS) * config.batch_size * config.seq_len
    tokens_per_s = tokens / (times[-1] - times[WARMUP_STEPS])

    forward = jax.jit(lambda w, x: model(x, w))
    windows, batch = data["val"], config.batch_size
    total_loss = total_correct = total = 0.0
    for start in range(0, len(windows), batch):
        chunk = jnp.asarray(windows[start:start + batch].astype(np.int32))
        clear_rope_caches(model)  # a last, shorter chunk is traced anew
        logits = forward(params, chunk[:, :-1])
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        target = chunk[:, 1:]
        total_loss -= float(jnp.take_along_axis(logp, target[..., None], axis=-1).sum())
        total_correct += float((logits.argmax(-1) == target).sum())
        total += target.size
    weights = {}
    for atom, w in zip(reference_atoms(model), params):
        w = np.asarray(w, dtype=np.float32)
        weights[lipflow_name(atom.tracker)] = w.T if atom.tracker == "embed" else w  # Embed is (d, vocab)
    np.savez(spec["weights"], **weights)
    device = jax.devices()[0]
    Path(spec["result"]).write_text(json.dumps({
        "val_loss": total_loss / total, "val_accuracy": total_correct / total, "train_loss": logger.loss,
        "tokens_per_s": tokens_per_s, "device": f"jax:{device.platform}:{device.device_kind}",
        "jax": jax.__version__}))


# ----------------------------------------------------------------------------- main process (torch + lipflow)


def jax_python(venv: Path) -> str:
    """An interpreter that imports jax: this one, else ``venv``'s; ``venv`` is created with
    ``pip install jax numpy`` when neither does."""
    if importlib.util.find_spec("jax") is not None:
        return sys.executable
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import jax, numpy"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return str(python)
    print(f"jax is not importable here: creating {venv} and running pip install jax numpy", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    if subprocess.run([str(python), "-m", "pip", "install", "-q", "jax", "numpy"]).returncode != 0:
        raise SystemExit(f"pip install jax failed: install jax for {sys.executable}, or give --venv a venv that has it")
    return str(python)


def reference_config(setting: dict[str, Any], point: str, steps: int) -> dict[str, Any]:
    """The notebook's shakespeare_gpt_muon_constrained dict (experiment.ipynb @ 158692e) at this shape."""
    from bench.common import reference_run

    project, w_max, _, _ = POINTS[point]
    recipe = reference_run()
    return {
        "optimizer": "muon", "project": {"default": project}, "w_max": w_max, "lr": recipe["lr"],
        "beta1": 0.9, "beta2": 0.95, "wd": 0.0, "spectral_wd": 0.0, "d_embed": setting["d_model"],
        "seq_len": setting["context"], "num_blocks": setting["n_layers"], "num_heads": setting["n_heads"],
        "softmax_scale": 1.0, "final_scale": 1.0, "residual_scale": 1.0, "scales_learnable": False,
        "blocks_mass": recipe["masses"]["blocks"], "layernorm_substitute": "none", "max_embed_inflation_factor": 16,
        "use_unembed": False, "model_dtype": "float32", "project_dtype": "float32", "zero_init": True,
        "sensitive_to_wmax": {"default": True}, "data": "shakespeare", "vocab_size": 65, "model": "gpt",
        "randomize_labels": False, "val_iters": 20, "val_interval": steps + 1, "batch_size": setting["batch_size"],
        "steps": steps, "accum_steps": 1, "pre_dualize": False, "post_dualize": True, "log_interval": steps,
        "schedule": "linear",
    }


def lipflow_overrides(setting: dict[str, Any], point: str, steps: int) -> dict[str, Any]:
    """lipflow keys for the same run: experiments/reference.yaml's run at this shape and point (module
    docstring: what has no key yet)."""
    from bench.common import reference_run

    _, _, constraint, sigma_max = POINTS[point]
    return {**reference_run(), **setting, "weight_constraint": constraint, "sigma_max": sigma_max, "steps": steps,
            "eval_every": steps, "eval_batches": 1, "checkpoint_every": 0, "device": "auto"}


def run_reference(python: str, spec: dict[str, Any], work: Path, threads: int | None) -> dict[str, Any]:
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    if threads == 1:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
                            " intra_op_parallelism_threads=1").strip()
    subprocess.run([python, str(Path(__file__).resolve()), "--worker", str(spec_path)], check=True, env=env)
    return json.loads(Path(spec["result"]).read_text())


def run_lipflow(cfg: dict[str, Any], shards: Path, out: Path, starts: np.ndarray) -> tuple[dict[str, Any], Any]:
    """Train with lipflow.train.trainer.Trainer; check it drew ``starts``; (metrics, trained model)."""
    import torch

    from lipflow.train.trainer import Trainer

    trainer = Trainer("reference-side-by-side", cfg, shards, out, progress=False)
    drawn, times = [], []
    sample_starts, train_step = trainer.train_data.sample_starts, trainer.train_step

    def recorded_starts(*args):
        drawn.append(sample_starts(*args))
        return drawn[-1]

    def timed_step():
        times.append(time.perf_counter())
        return train_step()

    trainer.train_data.sample_starts, trainer.train_step = recorded_starts, timed_step
    summary = trainer.run()
    if summary["status"] != "completed":
        raise RuntimeError(f"lipflow run {summary['status']}: {summary['diverged_reason']}")
    if not np.array_equal(torch.stack(drawn).numpy(), starts):
        raise RuntimeError("lipflow's Trainer drew other windows than the reference was given")
    tokens = cfg["batch_size"] * cfg["context"]
    return {"tokens_per_s": (len(times) - 1 - WARMUP_STEPS) * tokens / (times[-1] - times[WARMUP_STEPS]),
            "train_loss": trainer.metrics[-1]["loss"]}, trainer


def weight_norms(weights: dict[str, Any]) -> dict[str, float]:
    """The reference's logged norms (Linear.log, Embed.log) by tracker, from lipflow-named weights."""
    from lipflow.model import rms_operator_norm

    norms = {}
    for name, w in weights.items():
        if name == "tok.weight":
            norms["embed"] = float(w.float().pow(2).mean(dim=1).sqrt().max())
            continue
        tracker = "out" if name == "head.weight" else next(
            f"{stem}{name.split('.')[1]}" for stem, part in TRACKERS.items() if name.endswith(f".{part}.weight"))
        norms[tracker] = rms_operator_norm(w)
    return norms


def bounds(weights: dict[str, Any], cfg: dict[str, Any], vocab: int, reference_bound: Callable) -> dict[str, float]:
    """lipflow's certificate and the reference's formula on the same weights, and the largest matrix norm."""
    import torch

    from lipflow.model import build_model

    model = build_model(cfg, vocab)
    model.load_state_dict({k: torch.as_tensor(v).float() for k, v in weights.items()})
    norms = weight_norms({k: torch.as_tensor(v) for k, v in weights.items()})
    output = {"parameters": {"data": "shakespeare", "softmax_scale": cfg["attn_scale"], "num_blocks": cfg["n_layers"]},
              "results": {tracker: {"weight_norm": [value]} for tracker, value in norms.items()}}
    return {"lipflow_bound": model.lipschitz_bound(), "reference_bound": float(reference_bound(output)),
            "max_weight_norm": max(v for k, v in norms.items() if k != "embed")}


def check_reference(reference: Path) -> None:
    needed = ("modula/compound.py", "models.py", "optimizers.py", "trainer.py", "utils.py", "configs.py",
              "data/shakespeare.py")
    missing = [n for n in needed if not (reference / n).is_file()]
    if missing:
        raise SystemExit(
            f"--reference {reference} is not a checkout of Arongil/lipschitz-transformers "
            f"(missing {', '.join(missing)}).\n"
            f"Get it with: git clone https://github.com/Arongil/lipschitz-transformers {reference} && "
            f"git -C {reference} checkout {REFERENCE_COMMIT}")
    git = subprocess.run(["git", "-C", str(reference), "rev-parse", "--show-toplevel", "HEAD"],
                         capture_output=True, text=True)
    top, _, head = git.stdout.partition("\n")
    if git.returncode != 0 or Path(top).resolve() != reference:  # an export, or inside another repository
        print(f"note: {reference} is not a git checkout; cannot confirm it is at {REFERENCE_COMMIT}", file=sys.stderr)
    elif not head.startswith(REFERENCE_COMMIT):
        print(f"warning: {reference} is at {head[:7]}, not {REFERENCE_COMMIT}", file=sys.stderr)


def markdown_table(results: list[dict[str, Any]]) -> str:
    lines = ["| point | implementation | val loss | val acc | lipflow bound | reference bound | max ‖W‖ | tokens/s "
             "| device |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['point']} | {r['impl']} | {r['val_loss']:.4f} | {r['val_accuracy']:.4f} | "
                     f"{r['lipflow_bound']:.4g} | {r['reference_bound']:.4g} | {r['max_weight_norm']:.3f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['device']} |")
    return "\n".join(lines)


def _evaluate(model, windows: np.ndarray, batch_size: int, device) -> dict[str, float]:
    import torch

    from lipflow.metrics import evaluate_windows

    metrics = evaluate_windows(model, torch.from_numpy(windows), batch_size, device)
    return {"val_loss": metrics["loss"], "val_accuracy": metrics["accuracy"]}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:  # the reference subprocess: jax and numpy only
        reference_worker(Path(argv[1]))
        return 0
    from bench.common import add_out_argument, parse_bench_args

    parser = argparse.ArgumentParser(description=summary_of(__doc__))
    parser.add_argument("--reference", type=Path, help="checkout of Arongil/lipschitz-transformers at 158692e")
    parser.add_argument("--full", action="store_true", help="the notebook's Shakespeare shape (for a GPU)")
    parser.add_argument("--steps", type=int, help="override the setting's step count")
    parser.add_argument("--points", nargs="+", choices=list(POINTS), default=list(POINTS))
    parser.add_argument("--threads", type=int, help="CPU cores for both implementations (torch threads and "
                                                     "CPU affinity; 1 also makes XLA single-threaded)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Tiny Shakespeare input.txt")
    parser.add_argument("--venv", type=Path, default=Path(tempfile.gettempdir()) / "lipflow-reference-jax",
                        help="venv for jax when this interpreter has none (created on first use)")
    parser.add_argument("--max-val-windows", type=int, help="cap on the val windows scored (default: all)")
    parser.add_argument("--quick", action="store_true", help="20 steps, 64 val windows; rows to results/bench/quick")
    add_out_argument(parser)
    args = parse_bench_args(parser, BENCH, argv)
    if args.reference is None:
        parser.error("--reference DIR is required (a checkout of Arongil/lipschitz-transformers at 158692e)")
    check_reference(args.reference.resolve())
    import torch

    from bench.common import device_label, machine, reference_run, row, run_configs, save_rows

    if args.threads:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])
        torch.set_num_threads(args.threads)
    name = "full" if args.full else "cpu"
    setting = SETTINGS[name]
    steps = 20 if args.quick else (args.steps or setting["steps"])
    if steps <= WARMUP_STEPS + 1:
        parser.error(f"--steps must exceed {WARMUP_STEPS + 1} (the tokens/s window starts at step {WARMUP_STEPS})")
    python = jax_python(args.venv)
    reference_bound = reference_function(args.reference / "utils.py", "calculate_lipschitz_constant", {})
    chars, train, val = reference_split(args.data.read_text(encoding="utf-8"))
    windows = val_windows(val, setting["context"], 64 if args.quick else args.max_val_windows)
    seed = reference_run()["seed"]
    starts = train_starts(len(train), setting["context"], setting["batch_size"], steps, seed)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"{date}; {machine()}; setting {name} {setting} steps {steps}; {len(windows)} val windows; "
          f"reference python {python}", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="lipflow-reference-") as tmp:
        work = Path(tmp)
        shards = write_shards(chars, train, val, work / "shards")
        np.savez(work / "data.npz", train=train, val=windows, starts=starts)
        for point in args.points:
            cfg = run_configs({}, {point: lipflow_overrides(setting, point, steps)})[point]
            spec = {"reference": str(args.reference.resolve()), "config": reference_config(setting, point, steps),
                    "data": str(work / "data.npz"), "seed": seed, "weights": str(work / f"{point}.npz"),
                    "result": str(work / f"{point}.json")}
            started = time.time()
            ref = run_reference(python, spec, work, args.threads)
            ref_weights = dict(np.load(spec["weights"]))
            print(f"{point}: reference done in {time.time() - started:.0f} s", flush=True)
            started = time.time()
            lip, trainer = run_lipflow(cfg, shards, work / f"{point}-lipflow", starts)
            device = trainer.device
            val_metrics = _evaluate(trainer.model, windows, setting["batch_size"], device)
            print(f"{point}: lipflow done in {time.time() - started:.0f} s", flush=True)
            lip_weights = {k: v.detach().cpu() for k, v in trainer.model.state_dict().items()}
            rows, done = [], []
            for impl, metrics, weights, dev in (("reference", ref, ref_weights, ref["device"]),
                                                ("lipflow", {**lip, **val_metrics}, lip_weights,
                                                 device_label(str(device)))):
                r = {"point": point, "impl": impl, "device": dev, **metrics,
                     **bounds(weights, cfg, len(chars), reference_bound)}
                done.append(r)
                for metric, unit in (("val_loss", "nats/token"), ("val_accuracy", "fraction"),
                                     ("train_loss", "nats/token"), ("lipflow_bound", "lipschitz"),
                                     ("reference_bound", "lipschitz"), ("max_weight_norm", "rms_to_rms"),
                                     ("tokens_per_s", "tokens/s")):
                    rows.append(row(BENCH, f"{name}.steps{steps}.{point}.{impl}.{metric}", r[metric], unit, dev))
            print(markdown_table(done), flush=True)
            save_rows(args, BENCH, rows)  # per point, so a run cut short keeps what it finished
            results += done
    print(markdown_table(results))
    return 0

if __name__ == "__main__":
    sys.exit(main())

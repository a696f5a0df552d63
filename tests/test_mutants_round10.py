"""Mutation-testing round 10: the models (lipflow.model), the data path (lipflow.data.loader), the training
loop and its checkpoints (lipflow.train) and the studies (lipflow.studies.image_mlp, lipflow.studies.icl).
Each test here holds a property (a second implementation written out in the test, a closed form, a
hand-computed tiny case) that a plausible wrong version of the code, which the rest of the suite let
through, breaks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lipflow.config import run_defaults
from lipflow.model import build_model


# --- lipflow.model: the forward passes written out by loops ----------------------------------------------

def _rope_by_pairs(x: torch.Tensor, t: int) -> torch.Tensor:
    """One head's vector at position t rotated pair by pair: (x_2i, x_2i+1) by the angle t·10000^(−2i/d)."""
    d = x.numel()
    out = torch.empty_like(x)
    for i in range(d // 2):
        angle = t * 10000.0 ** (-2 * i / d)
        c, s = math.cos(angle), math.sin(angle)
        out[2 * i] = x[2 * i] * c - x[2 * i + 1] * s
        out[2 * i + 1] = x[2 * i] * s + x[2 * i + 1] * c
    return out


def _attention_by_loops(x, w_q, w_k, w_v, w_o, n_heads, scale, rope):
    """W_o·concat_h Σ_{s ≤ t} softmax_s(scale·q_t^h·k_s^h)·v_s^h for one sequence x (T, d), loop by loop."""
    T, d = x.shape
    d_h = d // n_heads
    q, k, v = x @ w_q.T, x @ w_k.T, x @ w_v.T
    y = torch.zeros(T, d, dtype=x.dtype)
    for h in range(n_heads):
        cols = slice(h * d_h, (h + 1) * d_h)
        for t in range(T):
            q_t = _rope_by_pairs(q[t, cols], t) if rope else q[t, cols]
            logits = []
            for s in range(t + 1):
                k_s = _rope_by_pairs(k[s, cols], s) if rope else k[s, cols]
                logits.append(scale * float(q_t @ k_s))
            top = max(logits)
            weights = [math.exp(z - top) for z in logits]
            total = sum(weights)
            for s in range(t + 1):
                y[t, cols] += weights[s] / total * v[s, cols]
    return y @ w_o.T


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return x * 0.5 * (1.0 + torch.special.erf(x / math.sqrt(2.0)))


def _layer_norm(x: torch.Tensor, ln: torch.nn.LayerNorm) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).pow(2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + ln.eps) * ln.weight.detach() + ln.bias.detach()


def test_lipschitz_gpt_forward_equals_the_paper_written_out_by_loops():
    """forward_embedded of a 2-block lipschitz_gpt (attn_scale 4, d_head 8, logit_scale 2, GELU) from its
    weights and the paper's constants only: every token projected onto RMS ≤ 1; per block
    x ← (1−α)x + α·⅓·W_o·attention and x ← (1−α)x + α·W_down·GELU(W_up·x)/1.128904 with α = 1/(2N) = ¼;
    attention scores (attn_scale/d_head)·RoPE(q_t)·RoPE(k_s) for s ≤ t, RoPE rotating pair i of position t
    by t·10000^(−2i/d_head); logits 2·W_head·x. A wrong score scale (1/√d_head), RoPE on one side only,
    heads and positions mixed in the reshape, or the fused residual's 1/(1−α) dropped each break it."""
    n_layers, d, n_heads, T = 2, 16, 2, 6
    cfg = run_defaults(model="lipschitz_gpt", d_model=d, n_layers=n_layers, n_heads=n_heads, context=T,
                       attn_scale=4.0, logit_scale=2.0, activation="gelu")
    torch.manual_seed(0)
    model = build_model(cfg, 11).double()
    with torch.no_grad():  # the output projections start at zero: give the branches something to add
        for block in model.blocks:
            block.attn.o.weight.normal_(0, 0.3)
            block.mlp.down.weight.normal_(0, 0.3)
    x = 1.5 * torch.randn(2, T, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model.forward_embedded(x)
    alpha, d_h, slope = 1 / (2 * n_layers), d // n_heads, 1.128904
    for b in range(2):
        z = x[b].clone()
        rms = z.pow(2).mean(-1, keepdim=True).sqrt()
        z = z * torch.clamp(1 / rms, max=1.0)
        for block in model.blocks:
            a = block.attn
            att = _attention_by_loops(z, a.q.weight.detach(), a.k.weight.detach(), a.v.weight.detach(),
                                      a.o.weight.detach(), n_heads, 4.0 / d_h, rope=True)
            z = (1 - alpha) * z + alpha * att / 3
            mlp = _gelu(z @ block.mlp.up.weight.detach().T) @ block.mlp.down.weight.detach().T / slope
            z = (1 - alpha) * z + alpha * mlp
        expected = 2.0 * z @ model.head.weight.detach().T
        torch.testing.assert_close(got[b], expected, rtol=1e-5, atol=1e-6)


def test_gpt_forward_equals_nanogpt_written_out_by_loops():
    """The baseline gpt from its weights: tok + pos embeddings, pre-LN blocks (each LayerNorm its own:
    trained gains and biases made different here), attention scaled 1/√d_head, GELU MLP, final LayerNorm,
    untied head."""
    d, n_heads, T = 16, 2, 6
    cfg = run_defaults(model="gpt", d_model=d, n_layers=2, n_heads=n_heads, context=T)
    torch.manual_seed(0)
    model = build_model(cfg, 11).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("blocks.", "ln_f.")) and p.ndim == 1:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.5)
    idx = torch.randint(0, 11, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model(idx)
    for b in range(2):
        z = model.tok.weight.detach()[idx[b]] + model.pos.weight.detach()[:T]
        for block in model.blocks:
            w_q, w_k, w_v = block.attn.qkv.weight.detach().chunk(3, dim=0)
            z = z + _attention_by_loops(_layer_norm(z, block.ln1), w_q, w_k, w_v, block.attn.out.weight.detach(),
                                        n_heads, 1 / math.sqrt(d // n_heads), rope=False)
            h = _layer_norm(z, block.ln2)
            z = z + _gelu(h @ block.mlp.up.weight.detach().T) @ block.mlp.down.weight.detach().T
        expected = _layer_norm(z, model.ln_f) @ model.head.weight.detach().T
        torch.testing.assert_close(got[b], expected, rtol=1e-9, atol=1e-9)



def test_param_roles_of_gpt_are_its_embeddings_matrices_head_and_layernorm_vectors():
    """gpt's roles by name: ``embed`` the token and position tables, ``head`` the readout, ``hidden`` the
    four matrices of each block, ``vector`` every LayerNorm gain and bias (1-D: no matrix optimizer or
    spectral constraint may take them)."""
    model = build_model(run_defaults(model="gpt", d_model=16, n_layers=2, n_heads=2, context=6), 11)
    roles = {role: [name for name, _ in params] for role, params in model.param_roles().items()}
    blocks = range(2)
    assert roles["embed"] == ["tok.weight", "pos.weight"]
    assert roles["head"] == ["head.weight"]
    assert roles["hidden"] == [f"blocks.{i}.{m}.weight" for i in blocks for m in ("attn.qkv", "attn.out", "mlp.up",
                                                                                 "mlp.down")]
    layer_norms = [f"blocks.{i}.{ln}.{p}" for i in blocks for ln in ("ln1", "ln2") for p in ("weight", "bias")]
    assert roles["vector"] == layer_norms + ["ln_f.weight", "ln_f.bias"]




def test_a_shard_writer_given_more_tokens_at_once_than_twice_its_buffer_grows_to_hold_them(tmp_path, monkeypatch):
    """The buffer starts at SHARD_BUFFER tokens (4 here) and must grow to whatever one add brings (50), not
    just double: the shard holds the 50 tokens in order."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.ipc as ipc

    from lipflow.data import tokenize
    monkeypatch.setattr(tokenize, "SHARD_BUFFER", 4)
    writer = tokenize.ShardWriter(tmp_path, "train", 100, np.dtype("uint16"))
    writer.add(np.arange(50, dtype=np.uint16))
    shards = writer.close()
    assert [shard["num_tokens"] for shard in shards] == [50]
    tokens = ipc.open_file(pa.memory_map(str(tmp_path / shards[0]["file"]))).get_batch(0).column("tokens")
    assert tokens.to_pylist() == list(range(50))


# --- lipflow.studies.image_mlp -------------------------------------------------------------------------

def test_image_mlp_snapshots_come_every_eval_every_steps_and_at_the_last_step():
    """steps 5, eval_every 2: snapshots at steps 2, 4 and 5 (the end, off the eval grid), each the weights
    of its step (copies, not the live model's tensors), the same in a second run (seeded init and batches)."""
    from lipflow.studies import image_mlp
    cfg = image_mlp.study_config({"width": 8, "steps": 5, "eval_every": 2, "batch_size": 16})
    method = next(iter(cfg["methods"].values()))
    data = image_mlp.digits_splits(cfg["seed"])
    snapshots = image_mlp.train_snapshots(method, cfg, data, cfg["seed"])
    assert [step for step, _, _ in snapshots] == [2, 4, 5]
    first, last = snapshots[0][2], snapshots[-1][2]
    assert any(not torch.equal(first[name], last[name]) for name in first)
    again = image_mlp.train_snapshots(method, cfg, data, cfg["seed"])  # seeded: the same weights at every snapshot
    assert all(torch.equal(a[2][name], b[2][name]) for a, b in zip(snapshots, again) for name in a[2])


def test_image_mlp_methods_are_compared_at_their_first_snapshot_reaching_the_lower_best_accuracy(monkeypatch):
    """Best val accuracies 0.9 (a) and 0.85 (b): the target is 0.85; a is scored at its first snapshot with
    accuracy ≥ 0.85 (step 20, not its last), b at step 30, each with that snapshot's weights, on the test split."""
    from lipflow.studies import image_mlp
    cfg = image_mlp.study_config({"width": 8, "steps": 30, "eval_every": 10, "seeds": 1})
    names = list(cfg["methods"])
    curves = {names[0]: [(10, 0.5), (20, 0.9), (30, 0.8)], names[1]: [(10, 0.6), (20, 0.7), (30, 0.85)]}
    template = build_model(run_defaults(**image_mlp.mlp_config(cfg)), image_mlp.CLASSES).state_dict()

    def weights(step):
        return {name: torch.full_like(value, float(step)) for name, value in template.items()}

    def fake_train(method, cfg_, data, seed):
        name = next(n for n, m in cfg["methods"].items() if m is method)
        return [(step, acc, weights(step)) for step, acc in curves[name]]

    scored = {}
    test_split = image_mlp.digits_splits(cfg["seed"])["test"]

    def fake_rows(model, split, cfg_, seed, **columns):
        scored[columns["method"]] = float(next(iter(model.state_dict().values())).flatten()[0])
        assert torch.equal(split[0], test_split[0]) and torch.equal(split[1], test_split[1])  # held-out test images
        return []

    monkeypatch.setattr(image_mlp, "train_snapshots", fake_train)
    monkeypatch.setattr(image_mlp, "robustness_rows", fake_rows)
    rows = image_mlp.run_image_mlp_study(cfg)
    table = {(r["method"], r["metric"]): r["value"] for r in rows}
    assert table[names[0], "matched_step"] == 20 and table[names[0], "val_accuracy"] == 0.9
    assert table[names[0], "final_val_accuracy"] == 0.8
    assert table[names[1], "matched_step"] == 30 and table[names[1], "val_accuracy"] == 0.85
    assert scored == {names[0]: 20.0, names[1]: 30.0}



def test_digits_splits_are_60_20_20_of_the_pixels_scaled_to_the_unit_interval():
    """1,797 digits: 1,078 / 359 / 360 images, 64 pixels each in [0, 1] with 16 (the data's
    largest intensity) at 1."""
    from lipflow.studies import image_mlp
    splits = image_mlp.digits_splits(0)
    assert [len(splits[name][0]) for name in ("train", "val", "test")] == [1078, 359, 360]
    from lipflow.studies.digits_split import images_in_test_split  # the size the job's runtime is counted from
    assert images_in_test_split() == len(splits["test"][0])
    pixels = torch.cat([splits[name][0] for name in ("train", "val", "test")])
    assert pixels.shape == (1797, 64) and pixels.min() == 0.0 and pixels.max() == 1.0


def test_image_mlp_robustness_rows_at_epsilon_zero_are_the_clean_numbers():
    """At ε = 0 the attack moves nothing: robust accuracy is the clean accuracy, the robust true-class
    probability the mean softmax probability of each image's true class and the robust loss the clean
    cross-entropy, all recomputed here."""
    from lipflow.studies import image_mlp
    cfg = image_mlp.study_config({"width": 8, "epsilons": [0.0, 0.3], "pgd_steps": 2})
    torch.manual_seed(0)
    model = build_model(run_defaults(**image_mlp.mlp_config(cfg)), image_mlp.CLASSES)
    with torch.no_grad():
        model.layers[-1].weight.normal_()
    x, y = image_mlp.digits_splits(0)["test"]
    x, y = x[:40], y[:40]
    rows = image_mlp.robustness_rows(model, (x, y), cfg, 0, method="m")
    value = {r["metric"]: r["value"] for r in rows if r.get("epsilon") in (None, 0.0)}
    with torch.no_grad():
        logits = model(x)
    assert value["robust_accuracy"] == value["clean_accuracy"] == pytest.approx(
        float((logits.argmax(1) == y).float().mean()))
    assert value["robust_true_class_probability"] == pytest.approx(
        float(logits.softmax(1)[torch.arange(len(y)), y].mean()), rel=1e-6)
    assert value["robust_loss"] == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-6)


# --- lipflow.studies.icl -------------------------------------------------------------------------------

def test_a_rotated_sigmas_eigenvectors_are_the_q_of_the_qr_whose_r_has_a_positive_diagonal():
    """Haar-random U (Mezzadri 2007): Q of the QR of a Gaussian matrix (seeded), columns signed so that R's
    diagonal is positive; without the signs U is not Haar-distributed. So Uᵀ·G is upper triangular with a
    positive diagonal for the seed's G."""
    from lipflow.studies.icl.data import SIGMA_KINDS
    for seed in range(4):
        u, eigenvalues = SIGMA_KINDS.get("rotated")(5, (1.0, 2.0, 3.0, 4.0, 5.0), seed)
        g = torch.randn(5, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        r = u.T @ g
        torch.testing.assert_close(r, r.triu(), rtol=0, atol=1e-12)
        assert (torch.diagonal(r) > 0).all(), seed
        torch.testing.assert_close(u.T @ u, torch.eye(5, dtype=torch.float64), rtol=0, atol=1e-12)
        assert eigenvalues.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]



def test_lipschitz_gpts_l2_bound_is_root_t_v_over_d_times_its_rms_bound_and_uses_the_heads_sigma_max():
    """L₂ = √T·|logit_scale|·σ_max(W_head)·L_body = √(T·V/d)·L_∞RMS (the RMS norms over V logits and d inputs
    converted to ℓ2), σ_max by an SVD here; with V = 40 ≠ d = 16 the RMS→RMS norm of the head in its place
    is a bound √(V/d) too small."""
    torch.manual_seed(0)
    model = build_model(run_defaults(model="lipschitz_gpt", d_model=16, n_layers=1, n_heads=2, context=6,
                                     logit_scale=1.5), 40).double()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.o.weight.normal_(0, 0.3)
            block.mlp.down.weight.normal_(0, 0.3)
    sigma = torch.linalg.svdvals(model.head.weight.detach().double())[0].item()
    for seq_len in (1, 6):
        l2 = model.lipschitz_bound_l2(seq_len)
        assert l2 == pytest.approx(math.sqrt(seq_len) * 1.5 * sigma * model.body_lipschitz(), rel=1e-12)
        assert l2 == pytest.approx(math.sqrt(seq_len * 40 / 16) * model.lipschitz_bound(), rel=1e-12)



def test_non_finite_parameter_names_the_first_bad_parameter_the_first_one_included():
    """A NaN in the first parameter is found (the name of the first non-finite one, in named_parameters
    order), an inf in a later one when the earlier are finite, and None when all are finite."""
    from lipflow.model.base import non_finite_parameter
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    assert non_finite_parameter(model) is None
    with torch.no_grad():
        model[1].bias[0] = math.inf
        assert non_finite_parameter(model) == "1.bias"
        model[0].weight[1, 1] = math.nan
        assert non_finite_parameter(model) == "0.weight"



def test_lipschitz_gpts_logits_carry_the_readout_multiplier_also_at_logit_scale_one():
    """logits = head(x)·logit_scale·output_mult: µP's readout multiplier (output_mult) scales the logits
    whatever logit_scale is, 1 included."""
    torch.manual_seed(0)
    model = build_model(run_defaults(model="lipschitz_gpt", d_model=16, n_layers=1, n_heads=2, context=6), 11)
    idx = torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = model(idx)
        model.output_mult = 0.25
        scaled = model(idx)
    assert model.logit_scale == 1.0
    torch.testing.assert_close(scaled, 0.25 * plain, rtol=1e-6, atol=0)


# --- lipflow.data.loader -------------------------------------------------------------------------------

@pytest.mark.parametrize("windows", [1, 3])
def test_sequential_windows_of_a_stream_of_whole_windows_and_one_token_take_them_all(char_shards, windows):
    """A stream of k·context + 1 tokens holds exactly k windows whose targets are tokens 1 … k·context, each
    once (the last window ends at the stream's last token): none of them left out of the whole-split eval."""
    from lipflow.data.loader import TokenShards
    context = 50
    data = TokenShards(char_shards, "val", max_tokens=windows * context + 1)
    stream = data.tokens(0, data.num_tokens).astype("int64").tolist()
    got = data.sequential_windows(context)
    assert got.tolist() == [stream[i * context:(i + 1) * context + 1] for i in range(windows)]
    assert got[:, 1:].reshape(-1).tolist() == stream[1:]


def test_clip_per_layer_shrinks_only_the_layers_above_the_norm_each_to_it():
    """Per layer block of the gradient (L, d, d): one of Frobenius norm 5 is scaled to 2, one of norm 0.5
    stays as it is (clipping never scales a gradient up), each independently of the other's norm."""
    from lipflow.studies.icl.train import clip_per_layer
    p = torch.nn.Parameter(torch.zeros(2, 2, 2, dtype=torch.float64))
    small = torch.tensor([[0.3, 0.0], [0.0, 0.4]], dtype=torch.float64)  # norm 0.5
    large = torch.tensor([[3.0, 0.0], [4.0, 0.0]], dtype=torch.float64)  # norm 5
    p.grad = torch.stack([large, small])
    clip_per_layer(p, 2.0)
    torch.testing.assert_close(p.grad[0], large * 0.4, rtol=1e-15, atol=0)
    assert torch.equal(p.grad[1], small)


def test_icl_training_records_the_lr_each_step_used_and_the_mean_query_loss():
    """lr halved every step (lr_halve_every 1): steps 0, 1, 2 used lr, lr/2, lr/4, which the curve records;
    step 0's loss is the mean over the batch of (prediction − y_query)² of the initial model on the first
    batch of the training stream, recomputed here from the seeds."""
    from lipflow.provenance import stream_seed
    from lipflow.studies.icl.config import load_config
    from lipflow.studies.icl.data import PromptSampler
    from lipflow.studies.icl.model import InContextTransformer
    from lipflow.studies.icl.train import train_model
    cfg = load_config({"d": 3, "sigma": {"kind": "identity"}, "train_steps": 3, "batch_size": 16, "lr_halve_every": 1,
                       "device": "cpu"})
    result = train_model(cfg, 2, 5, log_every=1, progress=False)
    assert result.steps == [0, 1, 2]
    assert result.lrs == [cfg.lr, cfg.lr / 2, cfg.lr / 4]
    sampler = PromptSampler(cfg, 5)
    model = InContextTransformer(3, 2, cfg.parametrization, cfg.attention, cfg.init_std,
                                 torch.Generator().manual_seed(stream_seed(cfg.seed, "init", 2, 5)))
    batch = sampler.sample(16, sampler.generator(cfg.seed, "train", 2, 5))
    with torch.no_grad():
        first = ((model(batch.tokens()) - batch.query_y) ** 2).mean().item()
    assert result.losses[0] == pytest.approx(first, rel=1e-6)


def test_optimal_per_step_sizes_start_at_the_kernel_polynomials_inverse_roots_which_are_already_optimal(monkeypatch):
    """H_jk = ∫₁² s^(j+k) ds (S uniform on [1, 2]): the best p(s) = Π(1 − a_ℓ s) with p(0) = 1 is the kernel
    polynomial c ∝ H⁻¹e₀, whose roots are real, in (1, 2); the step sizes are their inverses. L-BFGS starts
    there and has nothing left to do: its start is the answer (and the loss is stationary there)."""
    import numpy as np

    from lipflow.studies.icl import theory
    size = 4  # L = 3
    j = torch.arange(size, dtype=torch.float64)
    power = j[:, None] + j[None, :] + 1
    problem = theory.StepSizeProblem((2.0 ** power - 1) / power, 0.0)
    coeffs = torch.linalg.solve(problem.hessian, torch.eye(size, dtype=torch.float64)[0])
    roots = np.polynomial.polynomial.polyroots(coeffs.numpy())
    assert np.all(np.abs(roots.imag) < 1e-12) and np.all((roots.real > 1) & (roots.real < 2))
    expected = torch.tensor(np.sort(1.0 / roots.real), dtype=torch.float64)
    starts = []
    original = theory.lbfgs_minimum
    monkeypatch.setattr(theory, "lbfgs_minimum", lambda loss, start, **kw: starts.append(start) or original(
        loss, start, **kw))
    steps = problem.optimal_per_step(3)
    torch.testing.assert_close(starts[0], expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(steps, expected, rtol=1e-9, atol=0)
    a = expected.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(problem.loss(a), a)
    assert grad.abs().max() < 1e-9


# --- lipflow.train -------------------------------------------------------------------------------------

def test_each_param_group_keeps_its_own_lr_as_its_base_lr_under_mup():
    """µP at twice the base width halves AdamW's hidden lr (lr_mult ½) and keeps the others: every group's
    base_lr is its own scaled lr (not the optimizer's default), which the schedule scales."""
    from lipflow.train.build import build_learner
    cfg = run_defaults(d_model=64, base_width=32, n_layers=1, n_heads=2, context=8, parametrization="mup",
                       optimizer="adamw", lr=0.01, device="cpu")
    _, optimizer, _, _ = build_learner(cfg, 40, torch.device("cpu"))
    lrs = {group["role"]: group["base_lr"] for group in optimizer.param_groups}
    assert lrs == {"embed": 0.01, "hidden": 0.005, "head": 0.01, "vector": 0.01}
    assert all(group["base_lr"] == group["lr"] for group in optimizer.param_groups)


def test_a_soft_capped_learner_starts_with_every_constrained_matrix_within_sigma_max():
    """The soft cap keeps ‖W‖_RMS→RMS ≤ σmax only from weights within it: build_learner scales the
    orthogonal init (norm 1) of every constrained matrix onto σmax = 0.5 (exact SVDs here)."""
    from lipflow.model.base import rms_operator_norm
    from lipflow.train.build import build_learner
    cfg = run_defaults(model="lipschitz_gpt", d_model=16, n_layers=1, n_heads=2, context=8, optimizer="muon", lr=0.05,
                       weight_constraint="spectral_soft_cap", sigma_max=0.5, device="cpu")
    torch.manual_seed(0)
    _, _, matrices, _ = build_learner(cfg, 40, torch.device("cpu"))
    norms = [rms_operator_norm(w) for w in matrices]
    assert len(matrices) == 7 and max(norms) <= 0.5 * (1 + 1e-6)
    assert sum(norm > 0.49 for norm in norms) == 5  # q, k, v, up and the head (o and down start at zero)


def test_collect_scores_each_learned_preconditioner_against_its_rank_matched_pgd_step(tmp_path):
    """Γ₀ = 0.5 Σ⁻¹, Γ₁ = 0.2 Σ⁻¹ against PGD steps 0.25 Σ⁻¹ (rank 0) and 0.4 Σ⁻¹ (rank 1): layer 1 is scored
    against 0.25 Σ⁻¹ and layer 0 against 0.4 Σ⁻¹, in closed form: relative and Σ-weighted errors |a − b|/b,
    whitened Σ^½ΓΣ^½ = a·I at distance 0 from the identity, Γ itself at Σ⁻¹'s distance, step sizes a and b."""
    from lipflow.studies.icl import study, tables
    from lipflow.studies.icl.config import load_config
    from lipflow.studies.icl.data import PromptSampler
    cfg = load_config({"layers": [2], "n_grid": [20]})
    n = cfg.n
    inverse = PromptSampler(cfg, n).sigma.inverse
    run_path = tmp_path / "L2.safetensors"
    meta = {"training_config": study.training_config(cfg), "n_layers": 2, "n": n,
            "curve": {"step": [1], "loss": [1.0], "lr": [0.1], "seconds": [0.0]}}
    study.save_weights(run_path, {"q": -torch.stack([0.5 * inverse, 0.2 * inverse])}, meta)
    pgd = {"method": "pgd", "n_layers": 2, "n": n, "loss": 0.125, "loss_stderr": 0.0, "expected_loss": None,
           "step_sizes": [0.25, 0.4], "preconditioners": [(b * inverse).flatten().tolist() for b in (0.25, 0.4)]}
    tables.write_table([pgd], tables.BASELINE_SCHEMA, tmp_path / "baselines.parquet")
    got = study.collect(cfg, str(tmp_path / "baselines.parquet"), [str(run_path)])
    alpha = torch.trace(inverse) / cfg.d
    inverse_distance = float(torch.linalg.norm(inverse - alpha * torch.eye(cfg.d, dtype=torch.float64))
                             / torch.linalg.norm(inverse))
    assert inverse_distance > 0.1  # Σ is not a multiple of I: Γ and Σ^½ΓΣ^½ are told apart
    rows = sorted((r for r in got["preconditioner_error"] if r["source"] == "transformer"), key=lambda r: r["layer"])
    for row, (layer, a, b) in zip(rows, [(0, 0.5, 0.4), (1, 0.2, 0.25)]):
        assert row["layer"] == layer and row["reference"] == "pgd"
        assert row["rel_frobenius_error"] == pytest.approx(abs(a - b) / b, rel=1e-9)
        assert row["sigma_weighted_error"] == pytest.approx(abs(a - b) / b, rel=1e-9)
        assert row["dist_whitened"] == pytest.approx(0.0, abs=1e-9)
        assert row["dist_identity"] == pytest.approx(inverse_distance, rel=1e-9)
        assert row["step_size"] == pytest.approx(a, rel=1e-9)
        assert row["reference_step_size"] == pytest.approx(b, rel=1e-9)
    assert len(rows) == 2


def test_the_start_up_check_refuses_a_folder_whose_newest_checkpoint_is_another_runs(tmp_path):
    """check_newest_is_this_runs reads the newest sealed checkpoint's header, also when it is the only one:
    another config's is a CheckpointError there (before any worker starts), this run's passes."""
    from lipflow.errors import CheckpointError
    from lipflow.train.checkpoint import TrainingState, check_newest_is_this_runs, save_checkpoint
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ours, theirs = ({"config_hash": h, "manifest_sha256": "m"} for h in ("ours", "theirs"))
    save_checkpoint(tmp_path, TrainingState(3, []), model, optimizer, torch.Generator(), theirs)
    check_newest_is_this_runs(tmp_path, theirs)
    with pytest.raises(CheckpointError, match="another run's checkpoint"):
        check_newest_is_this_runs(tmp_path, ours)

"""Figures and tables of the experiments, drawn from the results database's views.

``python -m lipflow.plots --db results/lipflow.duckdb --out-dir results/figures
[--tables-dir results/tables] [--experiment NAME ...]``

Each figure is a function registered in ``FIGURES`` under its name in
``lipflow.experiments.EXPERIMENT_FIGURES``; it reads the experiment's views and returns a matplotlib
figure, saved as ``<out-dir>/<name>.png`` and ``.svg`` (Agg backend, written to a temp file and
renamed). ``--tables-dir`` also writes each of the experiment's views (``EXPERIMENT_VIEWS``) as CSV.
Without ``--experiment`` every experiment whose headline view has rows is drawn and the others are
listed as skipped; a named experiment whose headline view is empty is an error that quotes the
reason recorded on the view.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from lipflow.experiments import EXPERIMENT_FIGURES, EXPERIMENT_VIEWS  # noqa: E402
from lipflow.registry import Registry  # noqa: E402

Figure = Callable[[object], "plt.Figure"]
FIGURES: Registry[Figure] = Registry("figure")
FORMATS = ("png", "svg")


def view(con, name: str, order: str = "") -> pd.DataFrame:
    return con.execute(f"SELECT * FROM {name} {order}").df()


def _colors(n: int) -> list:
    cmap = plt.get_cmap("viridis" if n > 4 else "tab10")
    return [cmap(i / max(n - 1, 1)) if n > 4 else cmap(i) for i in range(n)]


# --------------------------------------------------------------------------- lipschitz_tradeoff

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


@FIGURES.register("tradeoff_accuracy")
def tradeoff_accuracy(con) -> plt.Figure:
    """Val accuracy against the certified bound (log x; the Pareto front of each optimizer as a line)
    and against the local certificate's radius (the ε where certified accuracy is half the clean)."""
    df = view(con, "pareto")
    fig, (ax, ax_local) = plt.subplots(1, 2, figsize=(12, 4.5))
    constraints = sorted(df.weight_constraint.unique())
    for color, (optimizer, group) in zip(_colors(df.optimizer.nunique()), df.groupby("optimizer")):
        for marker, constraint in zip(MARKERS, constraints):
            sub = group[group.weight_constraint == constraint]
            if len(sub):
                ax.scatter(sub.lipschitz_bound, 100 * sub.val_accuracy, color=color, marker=marker, alpha=0.7,
                           label=f"{optimizer} · {constraint}")
                local = sub[sub.local_radius.notna() & (sub.local_radius > 0)]
                ax_local.scatter(local.local_radius, 100 * local.val_accuracy, color=color, marker=marker,
                                 alpha=0.7, label=f"{optimizer} · {constraint}")
        front = group[group.on_front].sort_values("lipschitz_bound")
        ax.step(front.lipschitz_bound, 100 * front.val_accuracy, where="post", color=color, lw=1.5,
                label=f"{optimizer} Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("certified Lipschitz bound L of the trained model (log scale)")
    ax.set_ylabel("val next-token accuracy (%)")
    ax.set_title("Accuracy vs certified Lipschitz bound (global)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    if (df.local_radius.fillna(0) > 0).any():
        ax_local.set_xscale("log")
        ax_local.legend(fontsize=7, ncol=2)
    else:
        ax_local.text(0.5, 0.5, "no local certificate: add the robustness\nevaluation to this experiment's runs",
                      ha="center", va="center", transform=ax_local.transAxes)
    ax_local.set_xlabel("local certified radius: ε where certified accuracy = clean/2 (ℓ2, log scale)")
    ax_local.set_title("Accuracy vs local certified radius")
    ax_local.grid(alpha=0.3)
    fig.tight_layout()
    return fig


@FIGURES.register("tradeoff_activation")
def tradeoff_activation(con) -> plt.Figure:
    """Largest |activation| in the residual stream against the certified bound (log–log)."""
    df = view(con, "pareto")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for color, (optimizer, group) in zip(_colors(df.optimizer.nunique()), df.groupby("optimizer")):
        ax.scatter(group.lipschitz_bound, group.max_activation, color=color, alpha=0.7, label=optimizer)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("certified Lipschitz bound L (log scale)")
    ax.set_ylabel("max |activation entry| over blocks on val batches")
    ax.set_title("Activation size vs certified Lipschitz bound")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    return fig


# --------------------------------------------------------------------------- lr_transfer

@FIGURES.register("lr_transfer")
def lr_transfer(con) -> plt.Figure:
    """Final val loss against lr, one line per width, one panel per method; ★ marks each optimum."""
    runs = view(con, "lr_transfer_runs", "ORDER BY method, width, lr")
    best = view(con, "lr_transfer")
    methods = sorted(runs.method.unique())
    widths = sorted(runs.width.unique())
    colors = dict(zip(widths, _colors(len(widths))))
    fig, axes = plt.subplots(1, len(methods), figsize=(4 * len(methods), 3.8), sharey=True, squeeze=False)
    for ax, method in zip(axes[0], methods):
        for width, group in runs[runs.method == method].groupby("width"):
            ax.plot(group.lr, group.final_loss, "o-", color=colors[width], ms=3, label=f"width {width}")
        opt = best[best.method == method]
        ax.scatter(opt.optimal_lr, opt.best_loss, marker="*", s=120, c=[colors[w] for w in opt.width],
                   edgecolors="black", zorder=3)
        drift = opt.drift.iloc[0] if len(opt) else float("nan")
        ax.set_title(f"{method}: optimal-lr drift ×{drift:.3g}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("peak learning rate (log₂ scale)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("final val loss (nats/token)")
    axes[0][0].legend(fontsize=8)
    finite = runs.final_loss.dropna()
    if len(finite):
        low, high = finite.min(), finite.quantile(0.9)
        axes[0][0].set_ylim(low - 0.05 * (high - low + 1e-9), high + 0.3 * (high - low + 1e-9))
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- super_consistency

def _parametrization_label(parametrization: str, depth_mup: bool) -> str:
    return f"{parametrization.upper()}{' + depth-µP' if depth_mup else ''}".replace("MUP", "µP")


@FIGURES.register("sharpness")
def sharpness(con) -> plt.Figure:
    """Sharpness against step; a panel per (parametrization, fixed depth) across widths and per
    (parametrization, fixed width) across depths; the title gives the mean spread. A second row shows
    Adam's preconditioned sharpness λ_max(P⁻¹H) when the runs logged it."""
    curves = view(con, "sharpness_curves", "ORDER BY step")
    spread = view(con, "sharpness_spread")
    panels = []
    for axis, size_col, fixed_col in (("width", "width", "depth"), ("depth", "depth", "width")):
        for key, group in curves.groupby(["parametrization", "depth_mup", fixed_col, "lr"]):
            if group[size_col].nunique() >= 2:
                panels.append((axis, size_col, fixed_col, key, group))
    rows = [("sharpness", "spread", "top Hessian eigenvalue λ_max\n(train loss, fixed batch)")]
    if curves.preconditioned_sharpness.notna().any():
        rows.append(("preconditioned_sharpness", "preconditioned_spread",
                     "Adam-preconditioned λ_max(P⁻¹H)\n(stable below (2+2β₁)/(1−β₁))"))
    fig, axes = plt.subplots(len(rows), len(panels), figsize=(4 * len(panels), 3.4 * len(rows)), squeeze=False)
    for row_axes, (column, spread_column, ylabel) in zip(axes, rows):
        for ax, (axis, size_col, fixed_col, (param, depth_mup, fixed, lr), group) in zip(row_axes, panels):
            sizes = sorted(group[size_col].unique())
            for color, size in zip(_colors(len(sizes)), sizes):
                run = group[group[size_col] == size]
                ax.plot(run.step, run[column], "o-", ms=3, color=color, label=f"{size_col} {size}")
            cells = spread[(spread.axis == axis) & (spread.parametrization == param) &
                           (spread.depth_mup == depth_mup) & (spread.fixed_size == fixed) & (spread.lr == lr)]
            ax.set_title(f"{_parametrization_label(param, depth_mup)}, {fixed_col} {fixed}\n"
                         f"mean spread {cells[spread_column].mean():.2f}", fontsize=10)
            ax.set_xlabel("training step")
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
        row_axes[0].set_ylabel(ylabel)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- rank_vs_n

@FIGURES.register("rank_vs_n")
def rank_vs_n(con) -> plt.Figure:
    """Measured gap and B3 bound against n (log–log, fitted slopes in the legend) and against rank."""
    df = view(con, "rank_bound", "ORDER BY n_heads, n")
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    heads = sorted(df.n_heads.unique())
    for color, h in zip(_colors(len(heads)), heads):
        sub = df[df.n_heads == h]
        positive = sub[sub.measured_gap > 0]
        axes[0].plot(positive.n, positive.measured_gap, "o-", color=color,
                     label=f"{h} head(s): slope {sub.gap_slope.iloc[0]:.2f}")
        axes[1].plot(sub.n, sub.b3_bound, "s--", color=color, label=f"{h} head(s): slope {sub.bound_slope.iloc[0]:.2f}")
        axes[2].scatter(sub.qk_rank, sub.measured_gap, color=color, label=f"gap, {h} head(s)")
        axes[2].scatter(sub.qk_rank, sub.b3_bound, color=color, marker="s", facecolors="none",
                        label=f"B3 bound, {h} head(s)")
    for ax, title in zip(axes[:2], ("measured gap vs n", "B3 rank bound vs n")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("n = training tokens / context (sequences, log scale)")
        ax.set_title(title)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("val loss − train loss (nats/token)")
    axes[1].set_ylabel("B3 Rademacher term at n (nats/token)")
    axes[2].set_yscale("log")
    axes[2].set_xlabel("mean numerical rank of W_Q W_Kᵀ per head (rtol 1e-2)")
    axes[2].set_ylabel("nats/token (log scale)")
    axes[2].set_title("gap and bound vs rank")
    axes[2].legend(fontsize=7)
    axes[2].grid(alpha=0.3, which="both")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- robustness

@FIGURES.register("robustness")
def robustness(con) -> plt.Figure:
    """Accuracy under ℓ2 PGD (solid) and certified accuracy, global (dashed) and local (dotted), against
    ε per model; the global and local certificates' tightness against ε; LM token substitutions
    against k; the digits MLP against ε."""
    df = view(con, "robustness")
    panels = []
    lm = df[df.domain == "lm"]
    if len(lm):
        panels.append(("language model: ℓ2 attack on token embeddings", lm, "epsilon",
                       "ε (ℓ2 norm of the embedding perturbation)"))
        if lm.k.notna().any():
            panels.append(("language model: token substitutions", lm, "k", "substituted tokens k"))
        if (lm.metric == "tightness_local").any():
            panels.append(("tightness: median PGD margin fall / certified fall", lm, "tightness",
                           "ε (ℓ2 norm of the embedding perturbation)"))
    image = df[df.domain == "image_mlp"]
    if len(image):
        panels.append(("digits MLP at matched clean accuracy: ℓ2 PGD", image, "epsilon",
                       "ε (ℓ2 norm of the pixel perturbation, pixels in [0, 1])"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4), squeeze=False)
    for ax, (title, data, x_col, x_label) in zip(axes[0], panels):
        labels = sorted(data.label.unique())
        for color, label in zip(_colors(len(labels)), labels):
            rows = data[data.label == label]
            bound = rows.certificate_l2.dropna()
            suffix = f" (L={bound.iloc[0]:.3g})" if len(bound) else ""
            if x_col == "epsilon":
                pgd = rows[(rows.metric == "robust_accuracy") & (rows.attack == "pgd")].sort_values("epsilon")
                ax.plot(pgd.epsilon, 100 * pgd.value, "o-", color=color, label=f"{label}{suffix}: PGD")
                for style, metric, what in (("--", "certified_accuracy", "certified (global)"),
                                            (":", "certified_accuracy_local", "certified (local)")):
                    cert = rows[rows.metric == metric].sort_values("epsilon")
                    if len(cert):
                        ax.plot(cert.epsilon, 100 * cert.value, style, color=color, label=f"{label}: {what}")
            elif x_col == "tightness":
                for style, metric in (("s--", "tightness_global"), ("o-", "tightness_local")):
                    sub = rows[(rows.metric == metric) & (rows.attack == "pgd")].sort_values("epsilon")
                    ax.plot(sub.epsilon, sub.value, style, color=color, label=f"{label}: {metric[10:]}")
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.set_ylabel("best attack / certificate (1 = tight)")
            else:
                for style, attack in (("o-", "greedy"), ("x:", "random")):
                    sub = rows[(rows.metric == "robust_accuracy") & (rows.attack == attack)].sort_values("k")
                    ax.plot(sub.k, 100 * sub.value, style, color=color, label=f"{label}: {attack}")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(x_label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("accuracy (%)")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- precision

FORMAT_ORDER = ("fp32", "bf16", "fp16", "fp8_e4m3", "fp8_e5m2", "int8")


@FIGURES.register("precision")
def precision(con) -> plt.Figure:
    """Val accuracy per number format, one bar per model; unscaled casts and per-tensor scaling."""
    df = view(con, "precision")
    labels = sorted(df.label.unique())
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, scaling, title in zip(axes, ("none", "per_tensor"), ("unscaled casts", "per-tensor scaled casts")):
        cells = df[(df.scaling == scaling) | df.format.isin(["fp32", "int8"])]
        formats = [f for f in FORMAT_ORDER if f in set(cells.format)]
        width = 0.8 / max(len(labels), 1)
        for i, (color, label) in enumerate(zip(_colors(len(labels)), labels)):
            rows = cells[cells.label == label].set_index("format")
            values = [100 * rows.accuracy.get(f, float("nan")) for f in formats]
            ax.bar(np.arange(len(formats)) + i * width, values, width, color=color, label=label)
        ax.set_xticks(np.arange(len(formats)) + width * (len(labels) - 1) / 2)
        ax.set_xticklabels(formats, rotation=20)
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel("val next-token accuracy (%)")
    axes[0].legend(fontsize=8)
    fig.supxlabel("number format of weights and matmul activations (int8: weights only, per channel)", fontsize=10)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- CLI

def _replace_atomically(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_figure(fig: plt.Figure, out_dir: Path, name: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in FORMATS:
        path = out_dir / f"{name}.{fmt}"
        _replace_atomically(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=150, bbox_inches="tight"))
        paths.append(path)
    plt.close(fig)
    return paths


def write_table(con, name: str, tables_dir: Path) -> Path:
    tables_dir.mkdir(parents=True, exist_ok=True)
    path = tables_dir / f"{name}.csv"
    _replace_atomically(path, lambda tmp: view(con, name).to_csv(tmp, index=False))
    return path


def empty_reason(con, name: str) -> str | None:
    """None when the view has rows; else the comment recorded on it by create_views."""
    if con.execute(f"SELECT count(*) FROM {name}").fetchall()[0][0]:
        return None
    rows = con.execute("SELECT comment FROM duckdb_views() WHERE view_name = ?", [name]).fetchall()
    return (rows[0][0] if rows and rows[0][0] else "empty").removeprefix("empty: ")


def draw(con, experiments: list[str], out_dir: Path, tables_dir: Path | None, strict: bool) -> list[Path]:
    """Figures (and tables) of ``experiments``; an empty headline view raises when ``strict``."""
    written = []
    for experiment in experiments:
        headline = EXPERIMENT_VIEWS[experiment][0]
        reason = empty_reason(con, headline)
        if reason is not None:
            if strict:
                raise ValueError(f"experiment {experiment}: view {headline} is empty: {reason}")
            print(f"skipped {experiment}: view {headline} is empty: {reason}", file=sys.stderr)
            continue
        for name in EXPERIMENT_FIGURES[experiment]:  # icl has none here: the ICL study draws its own
            written += save_figure(FIGURES.get(name)(con), out_dir, name)
        if tables_dir is not None:
            written += [write_table(con, v, tables_dir) for v in EXPERIMENT_VIEWS[experiment]]
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lipflow.plots", description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, default=Path("results/lipflow.duckdb"))
    parser.add_argument("--out-dir", type=Path, default=Path("results/figures"))
    parser.add_argument("--tables-dir", type=Path, default=None, help="also write each view as CSV here")
    parser.add_argument("--experiment", action="append", default=None,
                        help=f"one of {', '.join(EXPERIMENT_FIGURES)} (repeatable; default: all with data)")
    args = parser.parse_args(argv)
    from lipflow.cli import connect, run_guarded

    def go() -> int:
        for name in args.experiment or []:
            if name not in EXPERIMENT_FIGURES:
                close = difflib.get_close_matches(name, EXPERIMENT_FIGURES, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ValueError(f"unknown experiment '{name}'{hint}; known: {', '.join(EXPERIMENT_FIGURES)}")
        con = connect(args.db)
        written = draw(con, args.experiment or list(EXPERIMENT_FIGURES), args.out_dir, args.tables_dir,
                       strict=bool(args.experiment))
        for path in written:
            print(path)
        return 0

    return run_guarded(go)


if __name__ == "__main__":
    sys.exit(main())

"""Figures of the ICL study: test loss vs number of layers and vs context length n."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lipflow.results.plotting import refuse_to_replace_figure, whole_number_x_axis, write_figure  # noqa: E402
from lipflow.studies.icl.tables import PLOTTED_METHODS  # noqa: E402
from lipflow.data.parquet import read_table_parquet  # noqa: E402

LABELS = {  # {attention}: the trained models' (icl.attention)
    "transformer": "trained {attention}-attention transformer",
    "pgd": "preconditioned GD (Σ⁻¹, optimal per-step sizes)",
    "gd": "GD (tuned constant step)",
    "least_squares": "least squares (min-norm)",
}
STYLES = {  # the transformer's hollow markers leave PGD visible where the two coincide
    "transformer": {"fmt": "o-", "markersize": 10, "markerfacecolor": "none", "zorder": 3},
    "pgd": {"fmt": "s--", "markersize": 5, "zorder": 4},
    "gd": {"fmt": "^:"},
    "least_squares": {"fmt": "d-."},
}
FIGURES = {
    "loss_vs_layers": ("n_layers", "number of layers L", "loss_by_layers"),
    "loss_vs_n": ("n", "in-context examples n", "loss_by_n"),
}


def plot_losses(rows: list[dict], x_key: str, xlabel: str, title: str, attention: str):
    """One line per plotted method: test loss (mean ± standard error) against ``x_key``; the trained
    models' label names their ``attention``."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in PLOTTED_METHODS:
        points = sorted((r[x_key], r["loss"], r["loss_stderr"]) for r in rows if r["method"] == method)
        if points:
            x, y, err = zip(*points)
            ax.errorbar(x, y, yerr=err, capsize=3, label=LABELS[method].format(attention=attention),
                        **STYLES[method])
    whole_number_x_axis(ax, [r[x_key] for r in rows])  # one L or n: else fractional ticks (L = 1.975)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test loss  E(ŷ − y_query)²")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def run_plots(results_dir: str | Path, out_dir: str | Path, attention: str) -> list[Path]:
    """Write icl_loss_vs_layers.{png,svg} and icl_loss_vs_n.{png,svg} into ``out_dir``, after reading
    every table (a missing one leaves no figure written), and return them; ``attention``: the trained
    models' (icl.attention)."""
    paths = {(name, ext): Path(out_dir) / f"icl_{name}.{ext}" for name in FIGURES for ext in ("png", "svg")}
    for path in paths.values():
        refuse_to_replace_figure(path, "--out-dir")
    tables = {name: read_table_parquet(Path(results_dir) / f"{table}.parquet").to_pylist()
              for name, (_, _, table) in FIGURES.items()}
    for name, (x_key, xlabel, _) in FIGURES.items():
        rows = tables[name]
        fixed = "n" if x_key == "n_layers" else "L"
        values = sorted({r["n" if x_key == "n_layers" else "n_layers"] for r in rows})
        title = f"In-context linear regression ({fixed} = {', '.join(map(str, values))})"
        fig = plot_losses(rows, x_key, xlabel, title, attention)
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        for ext in ("png", "svg"):
            write_figure(fig, paths[name, ext], ext)
        plt.close(fig)
    return list(paths.values())

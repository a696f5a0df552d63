"""What an experiment's figure function needs: its declaration (:class:`Figure`), matplotlib on the
Agg backend (imported on first use, so loading the experiments at Snakefile parse time stays cheap),
a view as a DataFrame and a colour cycle."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lipflow.atomic import atomic_write, refuse_to_replace

# Written into every figure's metadata: what marks a PNG or SVG file as one lipflow drew.
FIGURE_MARK = {"png": {"Software": "lipflow"}, "svg": {"Creator": "lipflow"}}


@dataclass(frozen=True)
class Figure:
    """A figure of an experiment: ``draw(con)`` returns a matplotlib figure read from the experiment's
    views (saved as results/figures/<name>.png and .svg); ``caption`` is its file of workflow/report."""

    draw: Callable
    caption: str


def pyplot():
    """``matplotlib.pyplot`` with the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_figure(fig, path: Path, fmt: str) -> None:
    """``fig`` as ``path`` in ``fmt`` (png or svg), atomically, with :data:`FIGURE_MARK` in its metadata."""
    with atomic_write(path) as f:
        fig.savefig(f, format=fmt, dpi=150, bbox_inches="tight", metadata=FIGURE_MARK[fmt])


def is_lipflow_figure(path: Path) -> bool:
    """Whether ``path`` carries :data:`FIGURE_MARK` (in the first 4 kB: PNG text chunks and SVG
    metadata come before the picture)."""
    with open(path, "rb") as f:
        return b"lipflow" in f.read(4096)


def refuse_to_replace_figure(path: Path, flag: str) -> None:
    """``path`` may replace a figure lipflow drew only, never a user's other file."""
    refuse_to_replace(path, flag, "a figure lipflow drew", is_lipflow_figure)


def read_view(con, name: str, order: str = ""):
    """The rows of view ``name`` as a pandas DataFrame (``order``: an ORDER BY clause)."""
    return con.execute(f"SELECT * FROM {name} {order}").df()


def colors(n: int) -> list:
    """``n`` distinct colours: tab10 for up to 4, else evenly spaced on viridis."""
    cmap = pyplot().get_cmap("viridis" if n > 4 else "tab10")
    return [cmap(i / max(n - 1, 1)) if n > 4 else cmap(i) for i in range(n)]

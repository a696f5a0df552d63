"""What an experiment's figure function needs: its declaration (:class:`Figure`), matplotlib on the
Agg backend (imported on first use, so loading the experiments at Snakefile parse time stays cheap),
a view as a DataFrame and a colour cycle."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


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


def read_view(con, name: str, order: str = ""):
    """The rows of view ``name`` as a pandas DataFrame (``order``: an ORDER BY clause)."""
    return con.execute(f"SELECT * FROM {name} {order}").df()


def colors(n: int) -> list:
    """``n`` distinct colours: tab10 for up to 4, else evenly spaced on viridis."""
    cmap = pyplot().get_cmap("viridis" if n > 4 else "tab10")
    return [cmap(i / max(n - 1, 1)) if n > 4 else cmap(i) for i in range(n)]

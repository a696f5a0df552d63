"""What an experiment's figure function needs: its declaration (:class:`Figure`), matplotlib on the
Agg backend (imported on first use, so loading the experiments at Snakefile parse time stays cheap),
a view as a DataFrame and a colour cycle."""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lipflow.atomic import is_sealed, refuse_to_replace, refuse_to_replace_sidecar, sidecar_path, write_with_sidecar

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
    """``fig`` as ``path`` in ``fmt`` (png or svg), atomically, with :data:`FIGURE_MARK` in its metadata and
    its ``.sha256`` sidecar, which tells a figure lipflow drew from one a user edited since
    (:func:`refuse_to_replace_figure`)."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format=fmt, dpi=150, bbox_inches="tight", metadata=FIGURE_MARK[fmt])
    write_with_sidecar(path, buffer.getvalue())


def figure_mark(fmt: str) -> re.Pattern[bytes]:
    """The bytes :data:`FIGURE_MARK` puts into a ``fmt`` file, exactly: the PNG text chunk (length, type,
    keyword, text, CRC), the SVG metadata's creator agent. lipflow named anywhere else (a user's title)
    is no mark."""
    ((key, value),) = FIGURE_MARK[fmt].items()
    if fmt == "png":
        chunk = b"tEXt" + key.encode("latin-1") + b"\0" + value.encode("latin-1")
        return re.compile(re.escape(struct.pack(">I", len(chunk) - 4) + chunk + struct.pack(">I", zlib.crc32(chunk))))
    return re.compile(rb"<dc:creator>\s*<cc:Agent>\s*<dc:title>" + re.escape(value.encode()) + rb"</dc:title>")


def is_lipflow_figure(path: Path) -> bool:
    """Whether ``path``, a PNG or SVG file by its name, carries its :func:`figure_mark` (in the first
    4 kB: PNG text chunks and SVG metadata come before the picture)."""
    fmt = Path(path).suffix.removeprefix(".")
    if fmt not in FIGURE_MARK:
        return False
    with open(path, "rb") as f:
        return figure_mark(fmt).search(f.read(4096)) is not None


def refuse_to_replace_figure(path: Path, flag: str) -> None:
    """``path`` may replace a figure lipflow drew only, as it drew it: one with its mark that matches its
    ``.sha256`` sidecar, or that has none (drawn before figures had one); a figure a user edited since (an
    annotation added in an SVG editor keeps the mark) no longer matches it and is kept, as is a user's other
    file. A file in the sidecar's place that is no checksum is refused too."""
    path = Path(path)
    refuse_to_replace(path, flag, "a figure lipflow drew",
                      lambda p: is_lipflow_figure(p) and (is_sealed(p) or not sidecar_path(p).exists()))
    refuse_to_replace_sidecar(path, flag)


RECEIPT_KEY = "drawn"  # the one key of a figures command's --receipt (lipflow.atomic.write_receipt)


def read_view(con, name: str, order: str = ""):
    """The rows of view ``name`` as a pandas DataFrame (``order``: an ORDER BY clause)."""
    return con.execute(f"SELECT * FROM {name} {order}").df()


def note_on_axes(ax, text: str, color: str | None = "0.4") -> None:
    """Write ``text`` in the middle of ``ax``: why a panel has nothing (or nothing on its scale) to draw."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color=color)


def whole_number_x_axis(ax, values) -> None:
    """Ticks of ``ax``'s x axis at whole numbers only (training steps, layer counts, context lengths), and
    x ± 1 when ``values`` hold one x: matplotlib's ±5 % around a lone point ticked 0.96, 0.98 … 1.04."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    distinct = set(values)
    if len(distinct) == 1:
        only = distinct.pop()
        ax.set_xlim(only - 1, only + 1)


def zeros_from_zero(ax, axis: str, values) -> None:
    """The ``axis`` ("x" or "y") of a panel of quantities ≥ 0 (ranks, activations, bounds) spans [0, 1] with
    5% margins when every finite value it places is 0: matplotlib's ±5% around the lone 0 ticked
    −0.04 … 0.04, values these quantities cannot take."""
    import numpy as np

    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if len(values) and not values.any():
        (ax.set_xlim if axis == "x" else ax.set_ylim)(-0.05, 1.05)


def spans_a_decade(values) -> bool:
    """Whether positive ``values`` span more than a factor 10, the figures' rule for a log axis."""
    values = list(values)
    return bool(values) and max(values) > 10 * min(values)


def category_colors(n: int) -> list:
    """``n`` distinct colours for unordered categories (runs, models, methods): tab10 for up to 10,
    tab20 for up to 20, else evenly spaced on viridis (whose order would suggest one up to there)."""
    if n > 20:
        return colors(n)
    cmap = pyplot().get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i) for i in range(n)]


def colors(n: int) -> list:
    """``n`` distinct colours for an ordered quantity (widths, head counts): tab10 for up to 4, else
    evenly spaced on viridis."""
    cmap = pyplot().get_cmap("viridis" if n > 4 else "tab10")
    return [cmap(i / max(n - 1, 1)) if n > 4 else cmap(i) for i in range(n)]

"""robustness: accuracy under ℓ2 attacks and certified accuracy, LM and digits MLP.

Newhouse et al. 2025 §3.3. View ``robustness`` (the LM runs' robustness evaluation and the
``image_mlp_robustness`` table of the image_mlp study); figure ``robustness``. Runs: robustness.yaml.
"""

from __future__ import annotations

from lipflow.results.plotting import Figure, category_colors, pyplot, read_view, zeros_from_zero
from lipflow.results.views import RUNS_NEED, Part, View

_ROBUST_METRICS = "('clean_accuracy', 'certified_accuracy', 'robust_accuracy', 'robust_loss', " \
                  "'robust_true_class_probability', 'lipschitz_lower_bound', 'certified_accuracy_local', " \
                  "'certified_radius_local_median', 'half_certified_epsilon', 'tightness_global', " \
                  "'tightness_local', 'within_100x_local')"
ROBUSTNESS = View(
    caption="table_robustness.rst",
    columns=("domain", "label", "run_id", "model", "optimizer", "weight_constraint", "seed", "certificate_l2",
             "metric", "attack", "epsilon", "k", "value"),
    types={"DOUBLE": ("certificate_l2", "epsilon", "value"),
           "VARCHAR": ("metric", "attack"),
           "BIGINT": ("k",)},
    parts=(
        Part(requires={"runs": RUNS_NEED + ("model", "optimizer", "weight_constraint", "seed"),
                       "evals": ("run_id", "eval", "metric", "value", "epsilon", "attack", "k")},
             absent_reason="no robustness runs with the robustness evaluation in the database",
             sql=f"""
        SELECT 'lm' AS domain, substr(r.name, strpos(r.name, '.') + 1) AS label, r.run_id, r.model,
               r.optimizer, r.weight_constraint, r.seed, c.certificate_l2, e.metric,
               CASE WHEN e.metric IN ('robust_accuracy', 'robust_loss', 'tightness_global', 'tightness_local',
                                      'within_100x_local') THEN e.attack END AS attack,
               e.epsilon, e.k, e.value
        FROM evals AS e JOIN runs AS r USING (run_id)
        LEFT JOIN (SELECT run_id, max(value) AS certificate_l2 FROM evals
                   WHERE eval = 'robustness' AND metric = 'certificate_l2' GROUP BY run_id) AS c USING (run_id)
        WHERE e.eval = 'robustness' AND r.experiment = 'robustness'
          AND e.metric IN {_ROBUST_METRICS} AND (e.metric <> 'lipschitz_lower_bound' OR e.attack = 'all')"""),
        Part(requires={"image_mlp_robustness": ("method", "optimizer", "weight_constraint", "seed", "metric", "value",
                                                "epsilon")},
             absent_reason="no digits-MLP rows (results/image_mlp/robustness.parquet was not made, or made "
                           "before it named each method's optimizer and seed: snakemake --forcerun "
                           "image_mlp_robustness)",
             sql=f"""
        SELECT 'image_mlp' AS domain, i.method AS label, NULL AS run_id, 'mlp' AS model,
               i.optimizer, i.weight_constraint, i.seed, c.certificate_l2, i.metric,
               CASE WHEN i.metric LIKE 'robust%' THEN 'pgd' END AS attack, i.epsilon, NULL AS k, i.value
        FROM image_mlp_robustness AS i
        LEFT JOIN (SELECT method, seed, max(value) AS certificate_l2 FROM image_mlp_robustness
                   WHERE metric = 'certificate_l2' GROUP BY method, seed) AS c USING (method, seed)
        WHERE i.metric IN {_ROBUST_METRICS}"""),
    ),
)

# headline view first; each view is also written as results/tables/<view>.csv
VIEWS = {"robustness": ROBUSTNESS}


def one_radius_axis(ax) -> None:
    """An ε axis whose lines share one radius ε spans [0, 2ε] ([0, 1] at ε = 0) with matplotlib's 5% margins:
    its own ±5% around the point ticked −0.04 … 0.04 at ε = 0 (epsilons: [0]) and 0.235, 0.24 … at ε = 0.25."""
    radii = {float(x) for line in ax.lines for x in line.get_xdata()}
    if len(radii) == 1:
        width = 2 * radii.pop() or 1.0
        ax.set_xlim(-0.05 * width, 1.05 * width)


# line, marker, marker fill and legend of the certified accuracies: markers on both, as a line through one
# point (epsilons: [0]) draws nothing, and unlike ones, as a local line equal to the global one hid it
CERTIFIED_STYLES = (("--", "s", "none", "certified (global)"), (":", "x", None, "certified (local)"))


def over_seeds(rows, x_col: str):
    """Per ``x_col`` value: the mean of ``value`` over the rows' seeds, its min and max, and ``seeds``, how
    many seeds have a value there."""
    spread = rows.groupby(x_col).value.agg(["mean", "min", "max", "count"]).reset_index()
    return spread.rename(columns={"count": "seeds"}).sort_values(x_col)


def fewer_seeds(line, seeds: int) -> str:
    """The legend's note where a line averages fewer than the model's ``seeds`` seeds at some point."""
    fewest = int(line.seeds.min()) if len(line) else seeds
    return f" ({fewest} of {seeds} seeds at some ε)" if fewest < seeds else ""


def nothing_drawn(ax, label: str, color, what: str, certified: bool) -> None:
    """A legend entry, with nothing drawn, for model ``label`` in a panel where it has no ``what``: a model
    without a certificate (an unconstrained GPT) says so; absent without a word, it read as left out by
    mistake."""
    why = f"no {what} recorded" if certified else f"no certificate, no {what}"
    ax.plot([], [], linestyle="none", color=color, label=f"{label}: {why}")


def robustness(con):
    """Accuracy under ℓ2 PGD (solid, ●) and certified accuracy, global (dashed, hollow ■) and local
    (dotted, ×; "= global at every ε" in the legend where the two coincide), against ε per model; the
    global and local certificates' tightness against ε; LM token substitutions against k; the digits MLP
    against ε, the mean over its seeds with their min–max band (a bar at a single ε). A model without a
    certificate (an unconstrained GPT) is named in the legend of the certified and tightness panels, "no
    certificate", with nothing drawn. Two panels a row."""
    plt = pyplot()
    df = read_view(con, "robustness")
    panels = []
    lm = df[df.domain == "lm"]
    if len(lm):
        panels.append(("language model: ℓ2 attack on token embeddings", lm, "epsilon",
                       "ε (ℓ2 norm of the embedding perturbation)"))
        if lm.k.notna().any():
            panels.append(("language model: token substitutions", lm, "k", "substituted tokens k"))
        if ((lm.metric == "tightness_local") & (lm.attack == "pgd")).any():  # epsilons [0]: only ε½'s rows
            panels.append(("tightness: median PGD margin fall / certified fall", lm, "tightness",
                           "ε (ℓ2 norm of the embedding perturbation)"))
    image = df[df.domain == "image_mlp"]
    if len(image):
        seeds = image.seed.nunique()
        over = f"\n(mean of {seeds} seeds, band: min–max)" if seeds > 1 else ""
        panels.append((f"digits MLP at matched clean accuracy: ℓ2 PGD{over}", image, "epsilon",
                       "ε (ℓ2 norm of the pixel perturbation, pixels in [0, 1])"))
    from matplotlib.ticker import MaxNLocator

    columns = min(len(panels), 2) or 1  # four panels in a row were 21 inches wide: unreadable when scaled to a screen
    n_rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(n_rows, columns, figsize=(5.2 * columns, 4 * n_rows), squeeze=False)
    for ax in axes.flat[len(panels):]:  # an odd count leaves one cell empty
        fig.delaxes(ax)
    color_of = dict(zip(sorted(df.label.unique()), category_colors(df.label.nunique())))  # one per model, every panel
    for ax, (title, data, x_col, x_label) in zip(axes.flat, panels):
        for label in sorted(data.label.unique()):
            color, rows = color_of[label], data[data.label == label]
            bounds = rows.drop_duplicates("seed").certificate_l2.dropna()
            # the seeds' range of L, one value where they agree to 3 digits ("L=27", not "L=27–27")
            span = [f"{bound:.3g}" for bound in (bounds.min(), bounds.max())] if len(bounds) else []
            suffix = f" (L={'–'.join(dict.fromkeys(span))})" if span else ""
            if x_col == "epsilon":
                pgd = over_seeds(rows[(rows.metric == "robust_accuracy") & (rows.attack == "pgd")], "epsilon")
                certified = [over_seeds(rows[rows.metric == metric], "epsilon")
                             for metric in ("certified_accuracy", "certified_accuracy_local")]
                same = all(len(cert) for cert in certified) and all(
                    certified[0][column].tolist() == certified[1][column].tolist()
                    for column in ("epsilon", "mean", "min", "max"))
                notes = ("", " = global at every ε" if same else "")  # the local line's legend says it
                lines = [(pgd, "o-", {}, f"{label}{suffix}: PGD")]
                lines += [(cert, style, {"marker": marker, "markersize": 7, "markerfacecolor": fill},
                           f"{label}: {what}{note}")
                          for (style, marker, fill, what), cert, note in zip(CERTIFIED_STYLES, certified, notes)]
                label_seeds = rows.seed.nunique()
                for line, style, marks, name in lines:
                    if len(line):
                        ax.plot(line.epsilon, 100 * line["mean"], style, color=color,
                                label=name + fewer_seeds(line, label_seeds), **marks)
                        if not (line.seeds > 1).any():
                            continue
                        if len(line) > 1:  # the digits MLP's seeds: their min–max band
                            ax.fill_between(line.epsilon, 100 * line["min"], 100 * line["max"], color=color,
                                            alpha=0.12, linewidth=0)
                        else:  # one radius: a band there has no area, so a bar
                            ax.vlines(line.epsilon, 100 * line["min"], 100 * line["max"], color=color, alpha=0.3,
                                      linewidth=6)
                if not any(len(cert) for cert in certified):
                    nothing_drawn(ax, label, color, "certified accuracy", certified=len(bounds) > 0)
            elif x_col == "tightness":
                drawn = False
                for style, metric in (("s--", "tightness_global"), ("o-", "tightness_local")):
                    sub = rows[(rows.metric == metric) & (rows.attack == "pgd")].sort_values("epsilon")
                    if len(sub):  # a model without a certificate has no tightness
                        ax.plot(sub.epsilon, sub.value, style, color=color, label=f"{label}: {metric[10:]}")
                        drawn = True
                if not drawn:
                    nothing_drawn(ax, label, color, "tightness", certified=len(bounds) > 0)
                ax.set_xscale("log")
                ax.set_yscale("log")
            else:
                for style, attack in (("o-", "greedy"), ("x:", "random")):
                    sub = rows[(rows.metric == "robust_accuracy") & (rows.attack == attack)].sort_values("k")
                    ax.plot(sub.k, 100 * sub.value, style, color=color, label=f"{label}: {attack}")
                ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # one k: else ticks at 0.96, …
        if x_col == "epsilon":
            one_radius_axis(ax)
        if x_col != "tightness":  # accuracies: all 0 (untrained runs) is no reason for ticks at −0.04 %
            zeros_from_zero(ax, "y", [y for line in ax.lines for y in line.get_ydata()])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(x_label)
        ax.set_ylabel("best attack / certificate (1 = tight)" if x_col == "tightness" else "accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


FIGURES = {"robustness": Figure(robustness, caption="figure_robustness.rst")}

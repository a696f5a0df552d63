"""icl: the in-context linear-regression study against optimal preconditioned gradient descent.

Ahn, Cheng, Daneshmand & Sra 2023 (arXiv 2306.00297). View ``icl_vs_pgd`` over the study's tables
(``icl_<table>``, from results/icl/). No figure here: the ICL study draws its own
(results/figures/icl_loss_vs_layers, icl_loss_vs_n; workflow/rules/icl.smk). Block: icl.yaml (no
language-model runs, ``studies: [icl]``).
"""

from __future__ import annotations

from lipflow.results.plotting import Figure
from lipflow.results.views import Part, View

ICL_VS_PGD = View(
    caption="table_icl_vs_pgd.rst",
    columns=("sweep", "n_layers", "n", "model_loss", "pgd_loss", "gd_loss", "least_squares_loss", "ratio_to_pgd",
             "prediction_correlation", "relative_prediction_mse", "max_step_size_rel_error"),
    types={"VARCHAR": ("sweep",),
           "BIGINT": ("n_layers", "n"),
           "DOUBLE": ("model_loss", "pgd_loss", "gd_loss", "least_squares_loss", "ratio_to_pgd",
                      "prediction_correlation", "relative_prediction_mse", "max_step_size_rel_error")},
    parts=(Part(requires={"icl_loss_by_layers": ("method", "n_layers", "n", "loss"),
                          "icl_loss_by_n": ("method", "n_layers", "n", "loss"),
                          "icl_agreement": ("n_layers", "n", "reference", "prediction_correlation",
                                            "relative_prediction_mse"),
                          "icl_step_sizes": ("n_layers", "n", "rel_error")},
                absent_reason="the ICL study did not run (experiments: [icl] or icl.enabled: true)",
                sql="""
        WITH losses AS (
            SELECT 'layers' AS sweep, method, n_layers, n, loss FROM icl_loss_by_layers
            UNION ALL
            SELECT 'n' AS sweep, method, n_layers, n, loss FROM icl_loss_by_n),
        p AS (
            SELECT sweep, n_layers, n,
                   avg(loss) FILTER (WHERE method = 'transformer') AS model_loss,
                   avg(loss) FILTER (WHERE method = 'pgd') AS pgd_loss,
                   avg(loss) FILTER (WHERE method = 'gd') AS gd_loss,
                   avg(loss) FILTER (WHERE method = 'least_squares') AS least_squares_loss
            FROM losses GROUP BY sweep, n_layers, n),
        a AS (SELECT n_layers, n, avg(prediction_correlation) AS prediction_correlation,
                     avg(relative_prediction_mse) AS relative_prediction_mse
              FROM icl_agreement WHERE reference = 'pgd' GROUP BY n_layers, n),
        s AS (SELECT n_layers, n, max(rel_error) AS max_step_size_rel_error FROM icl_step_sizes GROUP BY n_layers, n)
        SELECT p.*, p.model_loss / p.pgd_loss AS ratio_to_pgd, a.prediction_correlation, a.relative_prediction_mse,
               s.max_step_size_rel_error
        FROM p LEFT JOIN a USING (n_layers, n) LEFT JOIN s USING (n_layers, n)"""),),
)

# headline view first; each view is also written as results/tables/<view>.csv
VIEWS = {"icl_vs_pgd": ICL_VS_PGD}

FIGURES: dict[str, Figure] = {}  # the ICL study draws its own figures

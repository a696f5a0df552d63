"""lipflow: train and audit Lipschitz-bounded transformers with one config and one `snakemake`.

Notebook API (both import lazily, so ``import lipflow`` stays cheap for Snakemake's parser):

    con = lipflow.connect()              # read-only DuckDB connection to results/lipflow.duckdb
    con.sql("select * from runs").df()
    run = lipflow.load_run("baseline-1a2b3c4d")   # config, summary, metrics, model on CPU/GPU
"""

__version__ = "0.1.0"


def connect(db=None):
    """Read-only DuckDB connection to the results database ``db`` (default ``$LIPFLOW_DB``, else
    ``results/lipflow.duckdb``)."""
    from lipflow.cli import connect as _connect

    return _connect(db)


def load_run(run_id, results="results", device="auto"):
    """A trained run: resolved config, summary, per-step metrics and the model with its checkpoint."""
    from lipflow.api import load_run as _load_run

    return _load_run(run_id, results=results, device=device)

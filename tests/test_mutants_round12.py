"""Mutation-testing round 12: the results database's build (lipflow.results.database: ingest, receipts, the
folder lock), the figures and tables (lipflow.results.figures, lipflow.results.plotting: sidecars, what is
refused), the database's code digest and receipt name (lipflow.plan_rules) and the Lanczos sharpness
(lipflow.evaluation.sharpness). Each test here holds a property (an exact recomputation, a closed form, a
second method) that a plausible wrong version of the code, which the rest of the suite let through, breaks."""

from __future__ import annotations

import os

import pytest

from test_database import results  # noqa: F401  (a fixture: results/ with two runs and a manifest)


# --- plan_rules: the database's code digest and receipt ------------------------------------------------------

def _fresh_digest(plan_rules) -> str:
    plan_rules.database_code_digest.cache_clear()
    return plan_rules.database_code_digest()


def test_the_code_digest_is_the_sha256_of_each_source_files_path_length_and_bytes_in_path_order(tmp_path, monkeypatch):
    """database_code_digest over a tree laid out as lipflow's, recomputed here from its definition: sha256 over
    (path within the checkout, NUL, byte length, NUL, bytes) of every .py below the folders (nested ones too)
    and the named file, then every caption .rst, each list in path order; hidden files, other suffixes and
    files outside DATABASE_CODE, folders and links are not read."""
    import hashlib

    import lipflow.plan_rules as plan_rules

    checkout = tmp_path / "checkout"
    package, report = checkout / "lipflow", checkout / "workflow" / "report"
    files = {"lipflow/results/views.py": "VIEWS = {}\n", "lipflow/results/deep/inner.py": "X = 1\n",
             "lipflow/experiments/a.py": "A = 'a'\n", "lipflow/experiments/z.py": "Z = 'z'\n",
             "lipflow/train/summary.py": "FIELDS = ()\n", "workflow/report/b.rst": "caption b\n",
             "workflow/report/a.rst": "caption a\n"}
    ignored = {"lipflow/results/.hidden.py": "hidden\n", "lipflow/results/notes.txt": "notes\n",
               "lipflow/train/loop.py": "LOOP = 1\n", "workflow/report/.a.rst": "hidden caption\n",
               "workflow/report/c.txt": "not a caption\n"}
    for name, text in {**files, **ignored}.items():
        (checkout / name).parent.mkdir(parents=True, exist_ok=True)
        (checkout / name).write_text(text)
    (package / "results" / "folder.py").mkdir()  # a folder named like a module is no source
    (package / "results" / "link.py").symlink_to(package / "results" / "views.py")
    monkeypatch.setattr(plan_rules, "PACKAGE", package)
    monkeypatch.setattr(plan_rules, "DATABASE_CODE", (package / "results", package / "experiments",
                                                      package / "train" / "summary.py"))
    monkeypatch.setattr(plan_rules, "REPORT_DIR", report)
    expected = hashlib.sha256()
    order = sorted(name for name in files if name.endswith(".py")) + sorted(n for n in files if n.endswith(".rst"))
    assert order[0] == "lipflow/experiments/a.py" and order[-1] == "workflow/report/b.rst"
    for name in order:
        data = files[name].encode()
        expected.update(name.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
    try:
        assert _fresh_digest(plan_rules) == expected.hexdigest()
    finally:
        plan_rules.database_code_digest.cache_clear()


def test_the_code_digest_changes_when_a_file_moves_between_folders_or_bytes_move_between_files(tmp_path, monkeypatch):
    """Same bytes, other layout: a module moved from results/ to experiments/ (same file name), or a line moved
    from one file's end to the next file's start, is another code and another digest."""
    import lipflow.plan_rules as plan_rules

    package = tmp_path / "lipflow"
    for folder in ("results", "experiments"):
        (package / folder).mkdir(parents=True)
    report = tmp_path / "report"
    report.mkdir()
    monkeypatch.setattr(plan_rules, "PACKAGE", package)
    monkeypatch.setattr(plan_rules, "DATABASE_CODE", (package / "results", package / "experiments"))
    monkeypatch.setattr(plan_rules, "REPORT_DIR", report)
    try:
        (package / "results" / "m.py").write_text("X = 1\n")
        first = _fresh_digest(plan_rules)
        (package / "results" / "m.py").rename(package / "experiments" / "m.py")
        moved = _fresh_digest(plan_rules)
        (package / "experiments" / "m.py").unlink()
        (package / "results" / "a.py").write_text("A = 1\nB = 2\n")
        (package / "results" / "b.py").write_text("C = 3\n")
        split_one = _fresh_digest(plan_rules)
        (package / "results" / "a.py").write_text("A = 1\n")
        (package / "results" / "b.py").write_text("B = 2\nC = 3\n")
        split_two = _fresh_digest(plan_rules)
        assert len({first, moved, split_one, split_two}) == 4
    finally:
        plan_rules.database_code_digest.cache_clear()


def test_the_code_digest_reads_the_runs_summary_fields_every_view_and_every_caption(monkeypatch):
    """The real digest reads lipflow/train/summary.py (the runs columns), every module of lipflow/experiments
    (the views) and of lipflow/results, and every caption of the report folder: an edit of any of them
    renames the database's receipt and rebuilds it."""
    from pathlib import Path

    import lipflow.plan_rules as plan_rules
    from lipflow.results.views import REPORT_DIR

    read = []
    original = Path.read_bytes

    def recording(self):
        read.append(self.resolve())
        return original(self)

    monkeypatch.setattr(Path, "read_bytes", recording)
    try:
        _fresh_digest(plan_rules)
    finally:
        plan_rules.database_code_digest.cache_clear()
    package = plan_rules.PACKAGE
    wanted = {package / "train" / "summary.py", *(package / "experiments").rglob("*.py"),
              *(package / "results").rglob("*.py"), *REPORT_DIR.glob("*.rst")}
    wanted = {path.resolve() for path in wanted if not path.name.startswith(".")}
    assert len(read) == len(set(read))
    assert set(read) == wanted
    assert package / "train" / "summary.py" in wanted and any(p.suffix == ".rst" for p in wanted)


class _PlanStub:
    def __init__(self, run_dirs: str, studies=()):
        self.config = {"resources": {}}
        self._run_dirs, self.studies = run_dirs, frozenset(studies)

    def database_run_dirs(self) -> str:
        return self._run_dirs

    def study_inputs(self) -> list[str]:
        from lipflow.plan import IMAGE_MLP

        return [IMAGE_MLP] if "image_mlp" in self.studies else []


def test_the_database_receipt_is_named_as_the_build_removes_it_and_names_each_input(monkeypatch):
    """database_receipt is ``<database>.<12 hex digits>.built`` (the name remove_other_receipts takes as a
    receipt), and another run set (any of its runs, not the first only), another set of studies or another
    code digest is another name."""
    import re

    import lipflow.plan_rules as plan_rules
    from lipflow.results.database import is_receipt_name
    from pathlib import Path

    def receipt(run_dirs="results/runs/a-00000000 results/runs/b-00000000", studies=(), digest="d" * 64):
        monkeypatch.setattr(plan_rules, "database_code_digest", lambda: digest)
        return plan_rules.RuleFunctions(_PlanStub(run_dirs, studies)).database_receipt("results/lipflow.duckdb")

    base = receipt()
    assert re.fullmatch(r"results/lipflow\.duckdb\.[0-9a-f]{12}\.built", base)
    assert is_receipt_name(Path("results/lipflow.duckdb"), Path(base).name)
    others = [receipt(run_dirs="results/runs/a-00000000 results/runs/c-00000000"),
              receipt(run_dirs="results/runs/a-00000000"), receipt(studies={"icl"}), receipt(studies={"image_mlp"}),
              receipt(digest="e" * 64)]
    assert len({base, *others}) == 1 + len(others)
    assert receipt() == base  # the same inputs: the same name


def test_the_study_tables_are_the_icl_tables_when_icl_is_on_and_the_image_mlp_table_when_it_is_on():
    """The database job's study tables: ICL's seven tables only when the ICL study is on, the digits-MLP
    robustness table only when that study is on."""
    from lipflow.plan import IMAGE_MLP
    from lipflow.plan_rules import ICL_TABLES, RuleFunctions

    icl = [f"results/icl/{name}.parquet" for name in ICL_TABLES]
    cases = {(): [], ("icl",): icl, ("image_mlp",): [IMAGE_MLP], ("icl", "image_mlp"): [*icl, IMAGE_MLP]}
    for studies, expected in cases.items():
        rules = RuleFunctions(_PlanStub("", studies))
        assert rules.study_tables(None) == expected
        assert rules.icl_tables(None) == (icl if "icl" in studies else [])


# --- results.database ----------------------------------------------------------------------------------------

def test_a_nested_config_value_is_its_sorted_json_text_whatever_order_config_json_holds(tmp_path, tiny_run_config):
    """runs.masses (a mapping) is its JSON text with sorted keys, and so is the config column: a config.json
    written with the keys in another order (by hand, by an older trainer) gives the same text."""
    import json

    import duckdb
    from test_database import build_here, make_run

    root = tmp_path / "results"
    masses = {"head": 1.0, "embed": 2.0, "blocks": 32.0}
    make_run(root, "a-00000000", {**tiny_run_config, "masses": masses})
    (root / "manifest.json").write_text(json.dumps({"format": "lipflow-token-shards/1", "dtype": "uint16",
                                                    "vocab_size": 10, "tokenizer": {}, "splits": {}}))
    with duckdb.connect(str(build_here(root)), read_only=True) as con:
        column, config = con.execute("SELECT masses, config FROM runs").fetchone()
    assert column == '{"blocks": 32.0, "embed": 2.0, "head": 1.0}'
    assert json.loads(column) == masses
    assert '"masses": {"blocks": 32.0, "embed": 2.0, "head": 1.0}' in config


# --- Lanczos sharpness ---------------------------------------------------------------------------------------

def _quadratic_of(a):
    """½θᵀAθ over θ split into a (3, 4) matrix and a vector (A of size ≥ 13): its Hessian is A."""
    import torch

    g = torch.Generator().manual_seed(1)
    matrix = torch.randn(3, 4, generator=g, requires_grad=True)
    vector = torch.randn(a.shape[0] - 12, generator=g, requires_grad=True)
    a32 = a.float()

    def loss():
        theta = torch.cat([matrix.reshape(-1), vector])
        return 0.5 * theta @ a32 @ theta

    return loss, [matrix, vector]


def _counting(monkeypatch):
    from lipflow.evaluation import sharpness

    calls = []
    original = sharpness.HessianOperator.__call__

    def counted(self, v):
        calls.append(1)
        return original(self, v)

    monkeypatch.setattr(sharpness.HessianOperator, "__call__", counted)
    return calls


def test_largest_eigenvalue_with_more_steps_than_dimensions_takes_exactly_dim_steps(monkeypatch):
    """iters beyond the dimension n: n Lanczos steps span the whole space (T_n is similar to H, so its top Ritz
    value is λ_max itself), and with tol 0 it takes all n of them, one Hessian-vector product each."""
    import torch

    from lipflow.evaluation.sharpness import largest_eigenvalue

    n = 13
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(7), dtype=torch.float64))
    spectrum = torch.tensor([3.0, 2.99, 2.98] + torch.linspace(-3, 2.9, n - 3).tolist(), dtype=torch.float64)
    loss, params = _quadratic_of((q * spectrum) @ q.T)
    calls = _counting(monkeypatch)
    top = largest_eigenvalue(loss, params, iters=40, tol=0.0, generator=torch.Generator().manual_seed(0)).value
    assert len(calls) == n
    assert abs(top - 3.0) < 1e-4


def test_largest_eigenvalue_of_a_small_scale_hessian_stops_on_the_relative_tolerance_only(monkeypatch):
    """The stop rule is relative to the top Ritz value (its pair's residual < tol·(|θ| + 1e-6)): a Hessian of
    scale 1e-3 with tol 0 takes every step given, however small the residual, and with tol 1e-3 it stops
    early on λ_max."""
    import torch

    from lipflow.evaluation.sharpness import largest_eigenvalue

    n = 40
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(8), dtype=torch.float64))
    spectrum = torch.tensor([2e-3] + torch.linspace(-5e-4, 5e-4, n - 1).tolist(), dtype=torch.float64)
    loss, params = _quadratic_of((q * spectrum) @ q.T)
    calls = _counting(monkeypatch)
    top = largest_eigenvalue(loss, params, iters=30, tol=0.0, generator=torch.Generator().manual_seed(0)).value
    assert len(calls) == 30 and abs(top - 2e-3) < 1e-6
    calls.clear()
    quick = largest_eigenvalue(loss, params, iters=30, tol=1e-3, generator=torch.Generator().manual_seed(0)).value
    assert len(calls) < 30 and abs(quick - 2e-3) < 1e-5


# --- results.figures and results.plotting --------------------------------------------------------------------

def test_save_figure_writes_both_formats_with_sidecars_and_closes_the_figure(tmp_path):
    """save_figure writes <name>.png and .svg, each matching its .sha256 sidecar and carrying lipflow's mark,
    and closes the figure (an experiment draws many: pyplot keeps every open one in memory)."""
    from lipflow.atomic import is_sealed
    from lipflow.results.figures import save_figure
    from lipflow.results.plotting import is_lipflow_figure, pyplot

    plt = pyplot()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    paths = save_figure(fig, tmp_path / "figures", "line")
    assert paths == [tmp_path / "figures" / "line.png", tmp_path / "figures" / "line.svg"]
    assert all(is_sealed(path) and is_lipflow_figure(path) for path in paths)
    assert not plt.fignum_exists(fig.number)


def test_largest_eigenvalue_does_not_stop_at_a_start_whose_rayleigh_quotient_is_zero():
    """H shifted so that the start vector's Rayleigh quotient, the first Ritz value, is 0: a stop relative to
    |θ| is not met there by the first pair's residual, so even a loose tol (0.5) goes on to a positive top
    Ritz value, and a tight one reaches λ_max."""
    import torch

    from lipflow.evaluation.sharpness import largest_eigenvalue

    n = 30
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(9), dtype=torch.float64))
    a = (q * torch.linspace(-4, 6, n, dtype=torch.float64)) @ q.T
    start = torch.randn(n, generator=torch.Generator().manual_seed(0)).double()  # random_vector's draw, seed 0
    h = a - (start @ a @ start) / (start @ start) * torch.eye(n, dtype=torch.float64)
    assert abs(float(start @ h @ start)) < 1e-9
    exact = float(torch.linalg.eigvalsh(h)[-1])
    loss, params = _quadratic_of(h)
    loose = largest_eigenvalue(loss, params, iters=30, tol=0.5, generator=torch.Generator().manual_seed(0)).value
    tight = largest_eigenvalue(loss, params, iters=30, tol=1e-4, generator=torch.Generator().manual_seed(0)).value
    assert exact / 2 < loose <= exact + 1e-4
    assert tight == pytest.approx(exact, rel=1e-3)


def test_check_views_names_a_missing_view_after_the_headline():
    """A database holding an experiment's headline view but not its second one is refused naming that one."""
    from pathlib import Path

    import duckdb

    from lipflow.results.figures import check_views

    con = duckdb.connect()
    con.execute("CREATE VIEW lr_transfer AS SELECT 1 AS x")
    with pytest.raises(ValueError, match=r"^--db x\.duckdb has no view lr_transfer_runs \(experiment lr_transfer\)"):
        check_views(con, Path("x.duckdb"), ["lr_transfer"])
    con.execute("CREATE VIEW lr_transfer_runs AS SELECT 1 AS x")
    check_views(con, Path("x.duckdb"), ["lr_transfer"])


@pytest.mark.parametrize("sql_type, number", [("DECIMAL(18,3)", True), ("DOUBLE", True), ("BIGINT", True),
                                              ("VARCHAR", False), ("BOOLEAN", False), ("DATE", False)])
def test_check_columns_takes_each_sql_type_as_duckdb_names_it(sql_type, number):
    """A number column may be any numeric type, DECIMAL(p, s) included (DuckDB names it with its precision);
    a text column must be VARCHAR, neither a number nor a boolean or a date."""
    from pathlib import Path

    import duckdb

    from lipflow.results.figures import check_columns

    con = duckdb.connect()
    con.execute(f"CREATE TABLE t (c {sql_type})")
    for kind in ("number", "text"):
        accepted = number if kind == "number" else sql_type == "VARCHAR"
        if accepted:
            check_columns(con, Path("x.duckdb"), {"t": {"c": kind}})
        else:
            refused = rf"^--db x\.duckdb: column t\.c is .*, not {kind} \(edited by hand\?\)$"
            with pytest.raises(ValueError, match=refused):
                check_columns(con, Path("x.duckdb"), {"t": {"c": kind}})


def test_the_runs_table_has_one_column_per_name_and_the_val_metrics_as_exact_doubles(results):
    """runs has each column once (run.json's device takes the config key's column, it is not a second one),
    and val_loss, val_accuracy and val_perplexity are the evaluation's float64 values, exactly."""
    import duckdb
    import pyarrow as pa
    from test_database import build_here

    from lipflow.data.parquet import write_table_parquet

    values = {"loss": 0.1, "accuracy": 0.3, "perplexity": 1.1}
    for run_id in ("a-00000000", "b-11111111"):
        run = results / "runs" / run_id
        write_table_parquet(run / "evals.parquet", pa.table({
            "run_id": [run_id] * 4, "eval": ["val"] * 3 + ["train"], "metric": [*values, "loss"],
            "value": [*values.values(), 9.0]}))
    with duckdb.connect(str(build_here(results)), read_only=True) as con:
        names = [row[0] for row in con.execute("DESCRIBE runs").fetchall()]
        got = con.execute("SELECT run_id, val_loss, val_accuracy, val_perplexity, typeof(val_loss), "
                          "typeof(val_accuracy), typeof(val_perplexity) FROM runs ORDER BY run_id").fetchall()
    from lipflow.config.runs import run_key_types
    from lipflow.results.database import SUMMARY_COLUMNS, VAL_COLUMNS

    expected = {"run_id", "name", "status", *run_key_types(), *SUMMARY_COLUMNS, *VAL_COLUMNS}
    assert "device" in run_key_types() and "device" in SUMMARY_COLUMNS
    assert sorted(names) == sorted(expected)
    assert got == [(run_id, 0.1, 0.3, 1.1, "DOUBLE", "DOUBLE", "DOUBLE") for run_id in ("a-00000000", "b-11111111")]


def test_a_table_of_any_view_is_refused_unless_lipflow_wrote_it(tmp_path):
    """refuse_to_replace_others checks the CSV of every view of an experiment, not the headline's only: a
    table without a sidecar is lipflow's when its first line is the view's header (ended by \\n or by \\r\\n,
    as a table written on Windows), any other is refused; a table that matches its sidecar is lipflow's
    whatever its header."""
    import duckdb

    from lipflow.atomic import write_with_sidecar
    from lipflow.results.figures import refuse_to_replace_others

    con = duckdb.connect()
    con.execute("CREATE VIEW lr_transfer AS SELECT 1 AS x")
    con.execute("CREATE VIEW lr_transfer_runs AS SELECT 1 AS a, 2 AS b")
    tables, figures = tmp_path / "tables", tmp_path / "figures"
    tables.mkdir()
    second = tables / "lr_transfer_runs.csv"
    (tables / "lr_transfer.csv").write_bytes(b"x\r\n1\r\n")
    second.write_bytes(b"a,b\r\n1,2\r\n")
    refuse_to_replace_others(con, ["lr_transfer"], figures, tables)
    second.write_bytes(b"a,b,mine\n1,2,3\n")
    with pytest.raises(FileExistsError, match="lr_transfer_runs.csv"):
        refuse_to_replace_others(con, ["lr_transfer"], figures, tables)
    write_with_sidecar(second, b"old,header\n1,2\n")
    refuse_to_replace_others(con, ["lr_transfer"], figures, tables)


def test_a_study_table_that_no_longer_matches_its_sidecar_is_refused_and_the_database_kept(results):
    """A study table is checked against its .sha256 like a run's files (a bench file, written without one, is
    not): one edited after the study wrote it stops the build, naming it, and the previous database stays."""
    import duckdb
    import pyarrow as pa
    from test_database import build_here

    from lipflow.data.parquet import write_table_parquet
    from lipflow.results.database import build

    out = build_here(results)
    before = out.read_bytes()
    table = results / "icl" / "loss_by_layers.parquet"
    table.parent.mkdir()
    write_table_parquet(table, pa.table({"method": ["transformer"], "n_layers": [1], "n": [20], "loss": [0.5]}))
    runs = sorted((results / "runs").iterdir())
    build(out, results / "manifest.json", runs, [table], results=results)
    with duckdb.connect(str(out), read_only=True) as con:
        assert con.execute("SELECT loss FROM icl_loss_by_layers").fetchall() == [(0.5,)]
    write_table_parquet(table, pa.table({"method": ["transformer"], "n_layers": [1], "n": [20], "loss": [0.25]}))
    edited = table.read_bytes()
    write_table_parquet(table, pa.table({"method": ["transformer"], "n_layers": [1], "n": [20], "loss": [0.5]}))
    table.write_bytes(edited)  # the bytes of another table under the first one's sidecar
    published = out.read_bytes()
    with pytest.raises(ValueError, match=str(table)):
        build(out, results / "manifest.json", runs, [table], results=results)
    assert out.read_bytes() == published != before


def test_two_study_files_of_one_table_are_refused_naming_both():
    """check_study_tables: two files making one table (icl/loss_by_layers.parquet of two folders) are one
    ValueError naming both, before anything is loaded; one file per table passes."""
    from pathlib import Path

    from lipflow.results.database import check_study_tables

    first, second = Path("results/icl/loss_by_layers.parquet"), Path("old/icl/loss_by_layers.parquet")
    check_study_tables([first, Path("results/icl/loss_by_n.parquet")])
    with pytest.raises(ValueError, match=rf"^--study-tables: {first} and {second} are both table icl_loss_by_layers$"):
        check_study_tables([first, Path("results/icl/loss_by_n.parquet"), second])


@pytest.mark.parametrize("rows, expected", [(3, 2), (1, 2), (2, 2)])
def test_check_database_takes_exactly_the_row_count_it_expects(tmp_path, rows, expected):
    """A table holding more rows than the build loaded is as wrong as one holding fewer: a StageError naming
    both counts; the count itself passes."""
    import duckdb

    from lipflow.errors import StageError
    from lipflow.results.database import check_database

    path = tmp_path / "db.duckdb"
    with duckdb.connect(str(path)) as con:
        con.execute(f"CREATE TABLE runs AS SELECT range AS x FROM range({rows})")
    if rows == expected:
        check_database(path, {"runs": expected})
    else:
        with pytest.raises(StageError, match=rf"^table runs holds {rows} rows, expected {expected}$"):
            check_database(path, {"runs": expected})


def test_the_training_curves_take_no_tables_dir_and_an_out_dir_must_be_a_folder(tmp_path, capsys):
    """--training-curves draws one figure: with --tables-dir it is a usage error (exit 2), like with
    --experiment; an --out-dir that exists and is no folder (here a named pipe, neither file nor folder) is one
    error line before the database is read."""
    import os

    from lipflow.results.figures import main

    with pytest.raises(SystemExit) as exit_:
        main(["--training-curves", "--tables-dir", str(tmp_path / "tables"), "--db", str(tmp_path / "none.duckdb")])
    assert exit_.value.code == 2
    assert "--training-curves draws one figure: without --experiment and --tables-dir" in capsys.readouterr().err
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    for extra in ([], ["--training-curves"]):
        assert main(["--db", str(tmp_path / "none.duckdb"), "--out-dir", str(pipe), *extra]) == 2
        assert capsys.readouterr().err == f"lipflow: error: --out-dir {pipe} exists and is not a folder\n"


@pytest.mark.parametrize("tables", [["runs"], ["shards"], ["notes"], ["runs", "notes"]])
def test_a_duckdb_file_without_both_of_lipflows_tables_is_no_lipflow_database(tmp_path, tables):
    """--out may replace a lipflow database only, one holding both runs and shards: a user's DuckDB file with a
    runs table alone (or shards alone, or other tables) is refused as no lipflow database, and kept; with both
    tables it is one (a rebuild of it is allowed)."""
    import duckdb

    from lipflow.results.database import check_out_replaceable, is_lipflow_database

    out = tmp_path / "mine.duckdb"
    with duckdb.connect(str(out)) as con:
        for table in tables:
            con.execute(f"CREATE TABLE {table} (x INTEGER)")
    before = out.read_bytes()
    assert not is_lipflow_database(out)
    with pytest.raises(FileExistsError, match=rf"^--out {out} exists and is not a lipflow database;"):
        check_out_replaceable(out)
    assert out.read_bytes() == before
    with duckdb.connect(str(out)) as con:
        for table in {"runs", "shards"} - set(tables):
            con.execute(f"CREATE TABLE {table} (x INTEGER)")
    assert is_lipflow_database(out)


def test_check_database_reads_every_view(tmp_path):
    """A view that no longer binds (its table lost the column it reads) fails check_database, though every
    table holds its rows: a database whose views cannot be read is never published."""
    import duckdb

    from lipflow.results.database import check_database

    path = tmp_path / "db.duckdb"
    with duckdb.connect(str(path)) as con:
        con.execute("CREATE TABLE runs AS SELECT 1 AS x")
        con.execute("CREATE VIEW headline AS SELECT x FROM runs")
    check_database(path, {"runs": 1})
    with duckdb.connect(str(path)) as con:
        con.execute("ALTER TABLE runs RENAME COLUMN x TO y")
    with pytest.raises(duckdb.Error, match="x"):
        check_database(path, {"runs": 1})


def test_plots_of_every_experiment_skip_the_empty_ones_and_a_named_empty_one_is_an_error(results, tmp_path, capsys):
    """Without --experiment every experiment whose headline view is empty is one "skipped" line and the command
    succeeds; naming one of them is an error quoting its view's reason."""
    from test_database import build_here

    from lipflow.experiments import CATALOG
    from lipflow.results.figures import main

    db = build_here(results)
    capsys.readouterr()
    assert main(["--db", str(db), "--out-dir", str(tmp_path / "figures")]) == 0
    captured = capsys.readouterr()
    skipped = [line.split(":")[0] for line in captured.err.splitlines()]
    assert skipped == [f"skipped {name}" for name in CATALOG] and captured.out == ""
    assert main(["--db", str(db), "--out-dir", str(tmp_path / "figures"), "--experiment", "lr_transfer"]) == 2
    assert capsys.readouterr().err.startswith("lipflow: error: experiment lr_transfer: view lr_transfer is empty: ")


def test_a_build_makes_exactly_the_tables_a_rebuild_may_drop(results):
    """The tables of a build without study tables are BUILT_TABLES, no more and no fewer (a table the build
    makes but BUILT_TABLES lacks would stop every rebuild; a name BUILT_TABLES has but no build makes would
    let a rebuild drop a user's table of that name), and its views are the experiments' VIEWS."""
    import duckdb
    from test_database import build_here

    from lipflow.experiments import VIEWS
    from lipflow.results.database import BUILT_TABLES

    with duckdb.connect(str(build_here(results)), read_only=True) as con:
        tables = {name for (name,) in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
        views = {name for (name,) in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
    assert tables == set(BUILT_TABLES)
    assert views == set(VIEWS)


def test_a_receipt_holds_exactly_the_receipt_keys(tmp_path):
    """is_receipt: a JSON object with the keys build() writes, no more and no fewer (a user's JSON that has them
    among others is theirs, neither removed nor replaced)."""
    import json

    from lipflow.results.database import RECEIPT_KEYS, is_receipt

    path = tmp_path / "lipflow.duckdb.built"
    for keys, expected in [(RECEIPT_KEYS, True), ((*RECEIPT_KEYS, "mine"), False), (RECEIPT_KEYS[:2], False)]:
        path.write_text(json.dumps(dict.fromkeys(keys, 1)))
        assert is_receipt(path) is expected, keys
    path.write_text(json.dumps([list(RECEIPT_KEYS)]))
    assert not is_receipt(path)


def test_remove_other_receipts_keeps_the_receipt_it_is_given_and_those_of_other_databases(tmp_path):
    """remove_other_receipts(out, receipt) removes out's other receipts (either naming) only: receipt itself,
    a receipt of another database, a receipt-named file recording another database and a user's file named like
    a receipt that holds none (other JSON, text) stay."""
    import json

    from lipflow.results.database import remove_other_receipts

    out = tmp_path / "lipflow.duckdb"

    def receipt(name: str, database: str = "lipflow.duckdb"):
        path = tmp_path / name
        path.write_text(json.dumps({"database": database, "sha256": "0" * 64, "rows": {}}))
        return path

    mine = receipt("lipflow.duckdb.0123456789ab.built")
    older, unhashed = receipt("lipflow.duckdb.ba9876543210.built"), receipt("lipflow.duckdb.built")
    other_db = receipt("other.duckdb.0123456789ab.built", "other.duckdb")
    recording_other = receipt("lipflow.duckdb.111111111111.built", "other.duckdb")
    users_json = tmp_path / "lipflow.duckdb.222222222222.built"
    users_text = tmp_path / "lipflow.duckdb.333333333333.built"
    users_json.write_text(json.dumps({"database": "lipflow.duckdb", "note": "mine"}))
    users_text.write_text("not a receipt\n")
    remove_other_receipts(out, mine)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in (mine, other_db, recording_other, users_json, users_text))
    assert not older.exists() and not unhashed.exists()


@pytest.mark.parametrize("name, expected", [
    ("lipflow.duckdb.0123456789ab.built", True), ("lipflow.duckdb.built", True),
    ("lipflow.duckdb.0123456789abc.built", False), ("lipflow.duckdb.0123456789a.built", False),
    ("lipflow.duckdb.0123456789AB.built", False), ("lipflow.duckdb.built.bak", False),
    ("lipflow.duckdb.built~", False), ("lipflowXduckdb.built", False), ("lipflow.duckdb.0123456789ab.built.bak", False),
    ("old-lipflow.duckdb.built", False), ("lipflow.duckdb.g123456789ab.built", False)])
def test_a_receipt_name_is_the_database_name_an_optional_12_hex_digit_digest_and_built(name, expected):
    """is_receipt_name takes exactly the names the database rule gives (``<out>.<12 lowercase hex>.built``,
    hashlib's hexdigest) or gave (``<out>.built``): a user's copy, another database's or a longer digest is not
    one, and the dot of the database's name is a dot."""
    from pathlib import Path

    from lipflow.results.database import is_receipt_name

    assert is_receipt_name(Path("results/lipflow.duckdb"), name) is expected


def test_the_folder_lock_is_exclusive_while_held_and_released_after(tmp_path):
    """folder_lock holds an exclusive flock on the folder: while it is held no other open file description gets
    even a shared lock on the folder (another build's publication waits); once the body ends, one gets an
    exclusive one at once."""
    import fcntl
    import os

    from lipflow.results.database import folder_lock

    other = os.open(tmp_path, os.O_RDONLY)
    try:
        with folder_lock(tmp_path):
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(other, fcntl.LOCK_UN)
    finally:
        os.close(other)
    assert list(tmp_path.iterdir()) == []  # no lock file left


def test_a_users_figure_with_a_matching_sidecar_but_no_mark_is_refused(tmp_path):
    """refuse_to_replace_figure needs lipflow's mark in the figure: a user's PNG beside a .sha256 that matches
    it (copied in with the file) is still not one lipflow drew, and is refused."""
    from lipflow.atomic import write_with_sidecar
    from lipflow.results.plotting import pyplot, refuse_to_replace_figure

    plt = pyplot()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    path = tmp_path / "rank_vs_n.png"
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")  # matplotlib's own metadata: no lipflow mark
    plt.close(fig)
    write_with_sidecar(path, buffer.getvalue())
    with pytest.raises(FileExistsError, match=rf"^--out-dir {path} exists and is not a figure lipflow drew"):
        refuse_to_replace_figure(path, "--out-dir")


def test_a_users_file_in_a_figures_sidecar_place_is_refused(tmp_path):
    """A figure's .sha256 is replaced only when it holds a checksum: a user's file named like it is refused, and
    kept, even when the figure itself is absent."""
    from lipflow.results.plotting import refuse_to_replace_figure

    sidecar = tmp_path / "rank_vs_n.svg.sha256"
    sidecar.write_text("my notes on the figure\n")
    with pytest.raises(FileExistsError, match=rf"^--out-dir {sidecar} exists and is not a sha256 checksum"):
        refuse_to_replace_figure(tmp_path / "rank_vs_n.svg", "--out-dir")
    sidecar.write_text("0" * 64 + "\n")
    refuse_to_replace_figure(tmp_path / "rank_vs_n.svg", "--out-dir")


def test_the_axis_helpers_set_limits_only_for_one_x_or_all_zero_finite_values():
    """whole_number_x_axis: one distinct x gives x ± 1, more leave matplotlib's limits; zeros_from_zero: finite
    values all 0 (an infinity or NaN beside them ignored) give [-0.05, 1.05] on that axis only, no finite value
    (an empty panel) or a nonzero one leave the limits as they were."""
    from lipflow.results.plotting import pyplot, whole_number_x_axis, zeros_from_zero

    plt = pyplot()
    fig, ax = plt.subplots()
    try:
        ax.set_xlim(10, 20)
        whole_number_x_axis(ax, [3, 3, 3])
        assert ax.get_xlim() == (2, 4)
        ax.set_xlim(10, 20)
        whole_number_x_axis(ax, [3, 4])
        assert ax.get_xlim() == (10, 20)
        for values, changed in [([0.0, float("inf")], True), ([0.0, float("nan"), 0.0], True), ([], False),
                                ([float("inf")], False), ([0.0, 2.0], False)]:
            for axis in ("x", "y"):
                ax.set_xlim(10, 20)
                ax.set_ylim(30, 40)
                zeros_from_zero(ax, axis, values)
                moved = (-0.05, 1.05) if changed else None
                assert ax.get_xlim() == (moved if changed and axis == "x" else (10, 20)), (values, axis)
                assert ax.get_ylim() == (moved if changed and axis == "y" else (30, 40)), (values, axis)
    finally:
        plt.close(fig)


def test_a_build_removes_what_a_killed_build_left_and_needs_the_receipts_folder(results, tmp_path):
    """A temp database a killed build left (its process gone) is removed by the next build, one of a live
    process is not; a --receipt in a folder that does not exist is refused before any work, the database
    untouched."""
    import subprocess

    from lipflow.atomic import HOST
    from lipflow.results.database import build

    out, runs = results / "lipflow.duckdb", sorted((results / "runs").iterdir())
    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = results / f".{out.name}.tmp-{HOST}-{gone.pid}-build"
    live = results / f".{out.name}.tmp-{HOST}-{os.getppid()}-build"
    stale.write_bytes(b"half a database")
    live.write_bytes(b"another build's")
    build(out, results / "manifest.json", runs, results=results)
    assert not stale.exists() and live.exists()
    before = out.read_bytes()
    receipt = tmp_path / "missing" / "lipflow.duckdb.0123456789ab.built"
    with pytest.raises(FileNotFoundError, match=rf"^--receipt {receipt}: folder {receipt.parent} does not exist$"):
        build(out, results / "manifest.json", runs, results=results, receipt=receipt)
    assert out.read_bytes() == before


def test_category_colors_are_tab10_up_to_10_tab20_up_to_20_then_viridis_and_colors_tab10_up_to_4():
    """category_colors(n): tab10's first n colours for n ≤ 10, tab20's for 11 ≤ n ≤ 20, else colors(n); colors(n):
    tab10's for n ≤ 4, else n evenly spaced viridis colours from its first to its last."""
    from lipflow.results.plotting import category_colors, colors, pyplot

    plt = pyplot()
    tab10, tab20, viridis = (plt.get_cmap(name) for name in ("tab10", "tab20", "viridis"))
    for n in (1, 10):
        assert category_colors(n) == [tab10(i) for i in range(n)]
    for n in (11, 20):
        assert category_colors(n) == [tab20(i) for i in range(n)]
    assert category_colors(21) == colors(21)
    assert colors(4) == [tab10(i) for i in range(4)]
    for n in (5, 21):
        got = colors(n)
        assert got == [viridis(i / (n - 1)) for i in range(n)]
        assert got[0] == viridis(0.0) and got[-1] == viridis(1.0)


def test_a_receipt_that_cannot_be_written_is_a_stage_error_saying_the_database_was_replaced(results, monkeypatch):
    """An OSError writing the receipt comes after the new database is in place: a StageError saying so (not
    "left as it was"), with the new database published and no temp file left."""
    import duckdb

    import lipflow.results.database as database
    from lipflow.errors import StageError

    out, runs = results / "lipflow.duckdb", sorted((results / "runs").iterdir())
    database.build(out, results / "manifest.json", runs[:1], results=results)

    def disk_full(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(database, "write_json_atomic", disk_full)
    receipt = results / "lipflow.duckdb.0123456789ab.built"
    with pytest.raises(StageError, match=rf"^database build failed, {out} replaced, but its receipt was not "
                                         r"written: \[Errno 28\] No space left on device$"):
        database.build(out, results / "manifest.json", runs, results=results, receipt=receipt)
    with duckdb.connect(str(out), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM runs").fetchone() == (2,)
    assert not receipt.exists()
    assert sorted(path.name for path in results.iterdir()) == ["lipflow.duckdb", "manifest.json", "runs"]


def test_the_bench_folder_is_the_one_beside_the_database_whatever_the_working_directory(results, tmp_path,
                                                                                         monkeypatch):
    """Without ``results`` the build reads the bench folder beside --out, not one in the working directory."""
    import duckdb
    from test_database import bench_file

    from lipflow.results.database import build

    bench_file(results / "bench" / "here.parquet", 1.5)
    elsewhere = tmp_path / "elsewhere"
    bench_file(elsewhere / "bench" / "there.parquet", 9.0)
    monkeypatch.chdir(elsewhere)
    out = results / "lipflow.duckdb"
    build(out, results / "manifest.json", sorted((results / "runs").iterdir()))
    with duckdb.connect(str(out), read_only=True) as con:
        assert con.execute("SELECT value FROM bench").fetchall() == [(1.5,)]


def test_runs_device_is_the_device_the_run_used_not_the_configs_setting(results):
    """runs.device is run.json's device (what the run trained on), not the config key's setting (auto), which
    the config column keeps."""
    import json

    import duckdb
    from test_database import build_here

    for run_id in ("a-00000000", "b-11111111"):
        run_json = results / "runs" / run_id / "run.json"
        run_json.write_text(json.dumps({**json.loads(run_json.read_text()), "device": "cpu"}))
        config_json = results / "runs" / run_id / "config.json"
        info = json.loads(config_json.read_text())
        config_json.write_text(json.dumps({**info, "config": {**info["config"], "device": "auto"}}))
    with duckdb.connect(str(build_here(results)), read_only=True) as con:
        rows = con.execute("SELECT device, config FROM runs").fetchall()
    assert [device for device, _ in rows] == ["cpu", "cpu"]
    assert all(json.loads(config)["device"] == "auto" for _, config in rows)


@pytest.mark.parametrize("values, expected", [([1.0, 10.0], False), ([1.0, 10.000001], True), ([2.0, 5.0], False),
                                              ([3.0], False), ([], False), ([0.5, 0.01], True)])
def test_spans_a_decade_means_more_than_a_factor_10(values, expected):
    from lipflow.results.plotting import spans_a_decade

    assert spans_a_decade(values) is expected

"""The ``lipflow`` command: query the results database and sample from a trained run.

    lipflow query "SELECT run_id, status, val_loss FROM runs" [--format table|csv|json] [--db PATH]
        [--max-rows 1000000]
    lipflow sample RUN_ID --prompt "To be" [--tokens 200] [--temperature 0.8] [--seed 0]
        [--device auto|cpu|cuda] [--results results]
    lipflow runs [--configfile overlay.yaml ...] [--config KEY=VALUE ...]   # the run ids snakemake plans with them

``--db`` defaults to ``$LIPFLOW_DB``, else results/lipflow.duckdb; ``LIPFLOW_DEBUG=1`` keeps the
traceback of a user error.

Output cut short by its reader (``lipflow query … | head``) ends the command quietly with status 141,
as a Unix tool killed by SIGPIPE does.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import re
import sys
from collections.abc import Iterable, Iterator
from decimal import Decimal
from pathlib import Path

from lipflow.errors import ArgumentParser, check_utf8, parse_json, run_guarded


def default_db() -> Path:
    """The database a command reads without ``--db``: ``$LIPFLOW_DB`` (empty is unset, as in a shell's
    ``LIPFLOW_DB= lipflow query …``), else results/lipflow.duckdb."""
    return Path(os.environ.get("LIPFLOW_DB") or "results/lipflow.duckdb")


# Set when the connection opens and locked: no file, URL or other database can be read or written
# (read_csv, COPY, ATTACH, glob …), no extension installed or loaded, no setting changed, and no
# spill files (DuckDB's temp_directory, <db>.tmp by default: a query too big for memory fails instead).
LOCKED_CONFIG = {"enable_external_access": False, "autoinstall_known_extensions": False,
                 "autoload_known_extensions": False, "temp_directory": "", "lock_configuration": True}


def connect(db: str | os.PathLike[str] | None = None):
    """A read-only DuckDB connection to the results database that reaches nothing outside it
    (:data:`LOCKED_CONFIG`); ``.df()`` works on it (``.pl()`` too where polars is installed)."""
    import duckdb

    if db is not None and not os.fspath(db):  # Path('') is '.', which names no database
        raise ValueError("the database path is empty (name a file, or none for $LIPFLOW_DB, else "
                         "results/lipflow.duckdb)")
    path = Path(db) if db is not None else default_db()
    if not path.is_file():
        raise FileNotFoundError(f"no results database at {path} (run `snakemake` first, or pass --db)")
    check_utf8(str(path), f"{'$LIPFLOW_DB' if db is None else 'the database path'} {str(path)!r}")
    try:
        return duckdb.connect(str(path), read_only=True, config=dict(LOCKED_CONFIG))
    except duckdb.Error as err:
        raise ValueError(f"cannot open {path} as a DuckDB database ({str(err).splitlines()[0]})") from None


def read_only_statement(con, sql: str) -> str:
    """``sql`` when it is exactly one SELECT (SHOW, DESCRIBE, SUMMARIZE, VALUES and FROM-first
    queries parse as one); anything else (several statements, COPY, ATTACH, INSTALL, LOAD, PRAGMA,
    SET, CALL …) is a ValueError saying why."""
    import duckdb

    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as err:
        raise ValueError(without_set_advice(str(err).splitlines()[0])) from None
    if not statements:
        raise ValueError("no SQL statement given (e.g. lipflow query \"SELECT * FROM runs\")")
    if len(statements) > 1:
        raise ValueError(f"lipflow query runs exactly one statement; got {len(statements)}")
    kind = statements[0].type
    if kind == duckdb.StatementType.MULTI:  # DuckDB expands a PIVOT without an IN list into several statements
        raise ValueError("lipflow query runs one SELECT; a PIVOT must name its columns' values "
                         "(PIVOT runs ON model IN ('gpt', 'lipschitz_gpt') USING count(*))")
    if kind != duckdb.StatementType.SELECT:  # named by its keyword: DuckDB's type of INSTALL is LOAD
        keyword = re.match(r"\s*([A-Za-z]*)", statements[0].query).group(1).upper() or kind.name
        raise ValueError(f"lipflow query runs only read-only SELECT statements, not {keyword}")
    check_reads_tables_only(con, sql)
    check_plan_reads_tables_only(con, sql)
    return sql


def duckdb_error_line(err: Exception) -> str:
    """DuckDB's error as one line: its first line and, when the next one is DuckDB's hint for a misspelt
    name ('Did you mean "runs"?', 'Candidate bindings: …'), that hint too."""
    first, *rest = str(err).splitlines() or [""]
    if rest and rest[0].startswith(("Did you mean", "Candidate bindings")):
        return f"{first} {rest[0].strip()}"
    return first


def without_set_advice(message: str) -> str:
    """DuckDB's error line without its advice to change a setting with SET, which lipflow query refuses
    (its configuration is locked): the nesting limit's 'Use "SET max_expression_depth TO x" …'."""
    advice = re.search(r'\s*Use "SET [^"]*".*$', message)
    return message if advice is None else message[:advice.start()] + " (a limit lipflow query keeps: simplify the query)"


# The table functions a query may call: generators, JSON over a column (runs.config, the activations
# JSON of train_metrics) and DuckDB's own catalog. Every other one reads something other than tables
# (read_text, read_blob, read_csv…: with external access off DuckDB still lets them read the database's
# own file and its write-ahead-log paths, by any spelling of those paths, `..` through a link included,
# so a planted <db>.wal.recovery link was followed) or runs SQL text of its own (query, query_table).
QUERY_TABLE_FUNCTIONS = ("range", "generate_series", "unnest", "repeat", "repeat_row", "json_each", "json_tree")
QUERY_TABLE_FUNCTION_PREFIXES = ("duckdb_", "pragma_")
PLAN_FUNCTION = re.compile(r'"Function"\s*:\s*"([^"\\]*)"')  # a table function in EXPLAIN (FORMAT json)'s plan
FILE_NAME_CHARACTERS = re.compile(r"[./\\:*?]")  # no table or view of lipflow's has one; a path has


def check_reads_tables_only(con, sql: str) -> None:
    """A ValueError naming the first table function of ``sql`` (one SELECT) that is not one of
    :data:`QUERY_TABLE_FUNCTIONS` or DuckDB's catalog functions, or the first table name that names a
    file (``FROM 'x.csv'``, ``DESCRIBE 'x.csv'``, or unquoted ``FROM x.csv``, which DuckDB reads as
    schema x, table csv and, finding no such schema, as the file x.csv), at any depth of the statement
    (DuckDB's own parse, ``json_serialize_sql``)."""
    try:
        tree = parse_json(con.execute("SELECT json_serialize_sql(?)", [sql]).fetchone()[0])
    except json.JSONDecodeError as err:
        raise ValueError(f"the query cannot be checked ({err.msg}); simplify it") from None
    if tree.get("error"):
        raise ValueError(f"the query cannot be checked: {tree.get('error_message', 'DuckDB could not parse it')}")
    known = {name.lower() for (name,) in con.execute(  # the qualifiers a table name may have: catalogs, schemas
        "SELECT database_name FROM duckdb_databases() UNION SELECT schema_name FROM duckdb_schemas()").fetchall()}
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        kind = node.get("type")
        if kind == "TABLE_FUNCTION":
            name = node["function"].get("function_name", "")
            if name not in QUERY_TABLE_FUNCTIONS and not name.startswith(QUERY_TABLE_FUNCTION_PREFIXES):
                raise not_allowed(name)
        elif kind in ("BASE_TABLE", "SHOW_REF"):
            name = str(node.get("table_name") or "").strip('"')
            qualifiers = [str(node.get(key) or "") for key in ("catalog_name", "schema_name")]
            if FILE_NAME_CHARACTERS.search(name) or any(q and q.lower() not in known for q in qualifiers):
                path = ".".join([*(q for q in qualifiers if q), name])
                raise ValueError(f"lipflow query reads only the database's tables and views; {path!r} names a "
                                 "file, or a schema the database does not have")
        stack.extend(node.values())


def not_allowed(name: str) -> ValueError:
    return ValueError(f"lipflow query reads only the database's tables and views; table function {name}() is not "
                      f"allowed (allowed: {', '.join(QUERY_TABLE_FUNCTIONS)}, duckdb_*, pragma_*)")


def check_plan_reads_tables_only(con, sql: str) -> None:
    """A ValueError naming the first table function DuckDB's plan of ``sql`` calls that
    :func:`check_reads_tables_only` would refuse: a view or macro stored in the database (one made
    elsewhere) is SQL the query's text does not show, and may read a link planted at a path DuckDB allows."""
    plan = con.execute(f"EXPLAIN (FORMAT json) {sql}").fetchone()[1]  # a query that does not bind fails here
    # the plan's "Function" keys, found in its text at any depth (Python's json stops at its recursion limit, a
    # plan of some 300 nested subqueries; DuckDB's json_tree is not in DuckDB 1.1); a quote inside a string the
    # query holds is escaped in the JSON, so no literal reads as such a key
    for name in PLAN_FUNCTION.findall(plan):
        name = name.lower()
        if name not in QUERY_TABLE_FUNCTIONS and not name.startswith(QUERY_TABLE_FUNCTION_PREFIXES):
            raise not_allowed(name)


def emit(text: str, end: str = "\n") -> None:
    """Print ``text`` to stdout now; a reader that closed the pipe is not an error (exit 141, quietly);
    a closed stdout (``>&-``) is a one-line error."""
    if sys.stdout is None:
        raise OSError("standard output is closed; nothing can be printed")
    try:
        print(text, end=end)
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's exit flush would fail again
        raise SystemExit(141) from None


NON_FINITE_JSON = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}  # keyed by Python's str of the float


def json_value(value):
    """``value`` as JSON can hold it: NaN and ±inf (not JSON) are the strings "NaN", "Infinity" and
    "-Infinity" (protobuf's JSON spelling; null would read as a missing value) at any depth, in a list,
    array, struct or map value too; a DECIMAL (a literal such as ``0.5``, SUMMARIZE's ``null_percentage``) is a
    number, as DuckDB computes with it, not its text; a map key JSON cannot hold (a date, a non-finite
    float: 'nan', 'inf', as DuckDB writes them) is its text."""
    if isinstance(value, float):
        return value if math.isfinite(value) else NON_FINITE_JSON[str(value)]
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, bytes):
        return blob_text(value)
    if isinstance(value, (list, tuple)):
        return [json_value(v) for v in value]
    if isinstance(value, dict):
        return {json_key(k): json_value(v) for k, v in value.items()}
    return value


def json_key(key):
    if key is None or isinstance(key, (str, int)) or (isinstance(key, float) and math.isfinite(key)):
        return key
    return str(key)


def blob_text(value: bytes) -> str:
    """A BLOB as DuckDB writes it as text (``blob::varchar``): printable ASCII as it is, other bytes and
    ``\\``, ``"``, ``'`` as ``\\xHH``; Python's text of it was ``b'ab'``."""
    return "".join(chr(byte) if 32 <= byte < 127 and chr(byte) not in "\\\"'" else f"\\x{byte:02X}"
                   for byte in value)


def nested_as_json(value):
    """A list, array, struct or map value as its JSON text (:func:`json_value`: "NaN", numbers, a date as
    its text), a BLOB as its text (:func:`blob_text`), any other value as it is: the table and CSV cell
    of a nested value, which Python's text of it wrote as ``[Decimal('1.5'), None]`` or
    ``datetime.date(2026, 12, 5)``."""
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(json_value(value), default=str, ensure_ascii=False, allow_nan=False)
    if isinstance(value, bytes):
        return blob_text(value)
    return value


def table_cell(value) -> str:
    """A value as one line of the table format: NULL, a float to 6 digits, a line break or tab as
    ``\\n``, ``\\r``, ``\\t`` (it broke the row into lines that read as rows of their own)."""
    if value is None:
        return "NULL"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(nested_as_json(value)).replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


def format_rows(columns: list[str], rows: list[tuple], fmt: str) -> str:
    if fmt == "csv":
        from io import StringIO

        buf = StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([map(nested_as_json, r) for r in rows])
        return buf.getvalue().rstrip("\n")
    if fmt == "json":
        repeated = next((name for name in columns if columns.count(name) > 1), None)
        if repeated is not None:  # a JSON object keeps one value per name: the other would be lost
            raise ValueError(f"column {repeated!r} appears twice in the result and a JSON object holds one "
                             "value per name; name the columns apart (… AS …) for --format json")
        records = [dict(zip(columns, map(json_value, r))) for r in rows]
        return json.dumps(records, default=str, indent=1, allow_nan=False)
    cells = [[table_cell(v) for v in r] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(columns, widths)), "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    lines.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(lines)


def fetch_rows(cursor, max_rows: int) -> list[tuple]:
    """Every row of ``cursor``'s result, or a ValueError when it has more than ``max_rows``: all rows
    are read before anything is printed, so an error while DuckDB computes them prints no partial result."""
    rows: list[tuple] = []
    while batch := cursor.fetchmany(min(10_000, max_rows + 1 - len(rows))):
        rows += batch
        if len(rows) > max_rows:
            raise ValueError(f"the result has more than {max_rows:,} rows (--max-rows); narrow it (WHERE, LIMIT, "
                             "GROUP BY), raise --max-rows, or read it in Python: "
                             "lipflow.connect().sql(sql).to_arrow_table()")
    return rows


def cmd_query(args: argparse.Namespace) -> int:
    import duckdb

    if args.max_rows < 1:
        raise ValueError(f"--max-rows must be at least 1, got {args.max_rows}")
    con = connect(args.db)
    try:
        cursor = con.execute(read_only_statement(con, args.sql))
        columns = [d[0] for d in cursor.description] if cursor.description else []
        rows = fetch_rows(cursor, args.max_rows)
        text = format_rows(columns, rows, args.format)
    except MemoryError:
        raise ValueError("the result does not fit in memory; narrow it (WHERE, LIMIT, GROUP BY) or lower "
                         "--max-rows") from None
    except OverflowError as err:  # a DuckDB value Python cannot hold, e.g. an interval of 2^31 days
        raise ValueError(f"a value of the result has no Python equivalent ({err}); cast it to VARCHAR") from None
    except RecursionError:
        raise ValueError(f"a value of the result is nested too deeply to print as {args.format}; unnest it or "
                         "cast it to VARCHAR") from None
    except RuntimeError as err:
        if str(err) == "Query interrupted":  # how DuckDB ends a query on Ctrl-C
            raise KeyboardInterrupt from None
        raise
    except duckdb.Error as err:
        first = without_set_advice(duckdb_error_line(err))
        if "read-only" in first.lower():
            first = f"the results database is read-only for queries ({first})"
        elif isinstance(err, duckdb.PermissionException):
            first = f"queries read only the results database ({first})"
        raise ValueError(first) from None
    emit(text)
    return 0


def decoded_pieces(tokenizer, prompt: list[int], drawn: Iterable[list[int]]) -> Iterator[str]:
    """The text of ``prompt`` and the drawn tokens, piece by piece as they come (``lipflow sample``
    prints as it samples). Incremental detokenization as in text-generation-inference and vLLM: each
    piece is what decoding a window that starts one printed token back adds to the decoding of the
    window's printed tokens, so a Metaspace or WordPiece decoder still puts its spaces between tokens
    (decoding token by token drops them) and the work stays linear in the tokens. A text that ends
    inside a UTF-8 character waits for the next token; the whole decoding settles any difference. A drawn
    special token is printed as its text (``<|endoftext|>``: where the model ends a document, as nanoGPT
    prints it); the tokenizers library's decode drops it by default."""
    def decode(tokens: list[int]) -> str:
        return tokenizer.decode(tokens, skip_special_tokens=False)

    ids, start, printed, pieces = list(prompt), 0, 0, []
    before = ""  # the decoding of the window's printed tokens, ids[start:printed]
    for tokens in drawn:
        ids += tokens
        text = decode(ids[start:])
        if len(text) > len(before) and text.startswith(before) and not text.endswith("\ufffd"):
            pieces.append(text[len(before):])
            yield pieces[-1]
            start, printed = printed, len(ids)
            before = decode(ids[start:printed])
    given, text = "".join(pieces), decode(ids)
    if text != given:
        yield text[len(given):] if text.startswith(given) else "\n" + text


MAX_SAMPLE_TOKENS = 2**48  # lipflow's largest count (the schema's $defs/count); islice takes at most 2^63 − 1


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from lipflow.api import load_run
    from lipflow.data.loader import load_tokenizer
    from lipflow.data.tokenize import unknown_token_id, vocab_size_of
    from lipflow.model.base import non_finite_parameter

    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ValueError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if not 1 <= args.tokens <= MAX_SAMPLE_TOKENS:
        raise ValueError(f"--tokens must be between 1 and {MAX_SAMPLE_TOKENS:,} (2^48), got {args.tokens}")
    if not 0 <= args.seed < 2**63:  # torch.Generator's range
        raise ValueError(f"--seed must be in [0, 2**63), got {args.seed}")
    run = load_run(args.run_id, results=args.results, device=args.device)
    broken = non_finite_parameter(run.model)
    if broken is not None:
        status, step = run.summary.get("status"), run.summary.get("diverged_step")
        why = f"it diverged at step {step}" if status == "diverged" and step is not None else f"its status is {status}"
        raise ValueError(f"run {args.run_id} has non-finite weights ({broken}; {why}): there is nothing to sample")
    tokenizer = load_tokenizer(run.data_dir)
    if vocab_size_of(tokenizer) != run.model.vocab_size:  # weights from before they recorded their manifest's sha256
        raise ValueError(f"run {args.run_id} was trained with vocabulary {run.model.vocab_size} but the tokenizer in "
                         f"{run.data_dir} has {vocab_size_of(tokenizer)}: tokenizer/checkpoint mismatch")
    encoding = tokenizer.encode(args.prompt, add_special_tokens=False)  # as the shards were encoded
    ids = encoding.ids
    if not ids:
        raise ValueError("--prompt encodes to no tokens")
    unknown_id = unknown_token_id(tokenizer)
    if unknown_id is not None and unknown_id in ids:  # it would be dropped from the prompt without a word
        start, end = encoding.offsets[ids.index(unknown_id)]
        raise ValueError(f"--prompt: {args.prompt[start:end]!r} is not in the run's vocabulary "
                         f"(the tokenizer in {run.data_dir} never saw it in training)")
    gen = torch.Generator(device=run.device).manual_seed(args.seed)
    drawn = run.model.sample_tokens(torch.tensor([ids], device=run.device), args.temperature, gen)
    try:
        for piece in decoded_pieces(tokenizer, ids, (token[0].tolist() for token in itertools.islice(drawn, args.tokens))):
            emit(piece, end="")
        emit("")
    except RuntimeError as err:  # torch.multinomial on probabilities that overflowed
        if "probability tensor" not in str(err):
            raise
        raise ValueError(f"run {args.run_id}'s next-token probabilities are not finite for this prompt "
                         f"({str(err).splitlines()[0]}); try a lower --temperature") from None
    return 0


WORKFLOW_CONFIGFILE = "config.yaml"  # the Snakefile's `configfile:`, a path Snakemake reads from the working directory


def read_config_file(path: str) -> dict:
    """One config file read as a Snakemake run of lipflow's Snakefile reads it: what the Snakefile refuses
    first (a repeated key, malformed YAML) as one line, then Snakemake's own reading (its YAML loader, a
    YTE template rendered, a file of no keys refused)."""
    from snakemake.common.configfile import load_configfile
    from snakemake.exceptions import WorkflowError
    from yte.exceptions import YteError

    from lipflow.config import ConfigError, load_config_file

    load_config_file(Path(path))
    try:
        return load_configfile(path)
    except (WorkflowError, YteError) as err:
        raise ConfigError(f"{path}: {' '.join(str(err).split())}") from None


def snakemake_config(configfiles: list[str], settings: list[str] = ()) -> dict:
    """The config ``snakemake --configfile FILES --config SETTINGS`` hands lipflow's Snakefile, composed as
    Snakemake's Workflow.configfile composes it: the files merged in order (a nested merge, later keys
    win) and the KEY=VALUE settings over them (parsed as Snakemake parses them), then config.yaml of the
    working directory under all that where there is one; without it, a run that names no file is
    refused, as Snakemake refuses it."""
    import copy

    from snakemake.cli import parse_config
    from snakemake.utils import update_config

    from lipflow.config import ConfigError

    overlay: dict = {}
    for path in configfiles:
        update_config(overlay, read_config_file(path))
    update_config(overlay, parse_config(list(settings)))
    config = copy.deepcopy(overlay)
    if os.path.exists(WORKFLOW_CONFIGFILE):
        update_config(config, read_config_file(WORKFLOW_CONFIGFILE))
        update_config(config, overlay)
    elif not configfiles:
        raise ConfigError(f"no {WORKFLOW_CONFIGFILE} in the working directory {os.getcwd()}, which the Snakefile "
                          "reads (run from the checkout, or name config files with --configfile)")
    return config


def cmd_runs(args: argparse.Namespace) -> int:
    from lipflow.plan import Plan

    plan = Plan.from_config(snakemake_config(args.configfile, args.config))
    plan.corpus_files()  # what snakemake refuses at parse time, refused here too
    plan.tokenizer_files()
    plan.check_data_folders()
    if plan.runs:  # none (a study alone) prints nothing, not an empty line that `wc -l` counts
        emit("\n".join(plan.runs))
    return 0


def run_command(command: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Run the parsed subcommand once each of its arguments is known to be UTF-8 text."""
    check_utf8_arguments(command, args)
    return args.fn(args)


def check_utf8_arguments(command: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A ValueError naming the first argument whose bytes are not UTF-8: Python passes such bytes on as
    lone surrogates, which DuckDB and the tokenizer (given SQL, a prompt or a path) fail on."""
    for action in command._actions:
        values = getattr(args, action.dest, None)
        for value in values if isinstance(values, list) else [values]:
            if isinstance(value, str):
                check_utf8(value, action.option_strings[0] if action.option_strings else f"the {action.dest.upper()}")


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="lipflow", description="lipflow results and checkpoints")
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("query", help="run SQL on results/lipflow.duckdb (read-only)")
    q.add_argument("sql")
    q.add_argument("--format", choices=["table", "csv", "json"], default="table")
    q.add_argument("--db", default=None, help="database file (default $LIPFLOW_DB, else results/lipflow.duckdb)")
    q.add_argument("--max-rows", type=int, default=1_000_000,
                   help="refuse a larger result (default 1,000,000): every row is held in memory before printing")
    q.set_defaults(fn=cmd_query)
    s = sub.add_parser("sample", help="generate text from a trained run")
    s.add_argument("run_id")
    s.add_argument("--prompt", required=True)
    s.add_argument("--tokens", type=int, default=200, help="how many tokens to draw (printed as they are drawn)")
    s.add_argument("--temperature", type=float, default=0.8)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    s.add_argument("--results", default="results")
    s.set_defaults(fn=cmd_sample)
    r = sub.add_parser("runs", help="list the run ids snakemake plans for a config")
    r.add_argument("--configfile", nargs="+", default=[],
                   help="overlays merged in order over config.yaml of the working directory (read first where it "
                        "exists; needed without an overlay), as snakemake --configfile merges them")
    r.add_argument("--config", nargs="+", default=[], metavar="KEY=VALUE",
                   help="top-level keys set over the files, parsed as snakemake --config parses them "
                        "(e.g. experiments=[lr_transfer])")
    r.set_defaults(fn=cmd_runs)
    args = parser.parse_args(argv)
    return run_guarded(lambda: run_command(sub.choices[args.command], args))


if __name__ == "__main__":
    sys.exit(main())

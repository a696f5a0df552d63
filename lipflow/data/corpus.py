"""Corpus stage: documents from a source → deterministic train/val split → JSONL.

    python -m lipflow.data.corpus --config-json '{"name": "pydoc", "source": "embedded"}' --out-dir DIR

writes ``DIR/train.jsonl`` and ``DIR/val.jsonl`` (one ``{"text": ...}`` per line) and
``DIR/corpus.json`` (documents, characters and UTF-8 bytes per split; the source), streaming one
document at a time. ``DIR`` appears complete or not at all (built in a temporary sibling). An
existing ``DIR`` is replaced only when it is this stage's earlier output (:func:`not_a_corpus`).

Sources (registry ``SOURCES``; ``paths`` are file paths or globs):

- ``embedded``: ``pydoc_data.topics`` from the Python standard library — 79 topics of English
  documentation prose (~465 KB), one document per topic. Nothing to download or install.
- ``files``: UTF-8 text files, one document per file. A *single* file is cut into documents of
  whole paragraphs: a document ends at the first blank line once it holds ≥ 2,000 characters (or
  at the first line end once it holds ≥ 20,000, for text without blank lines), so even one file
  (Tiny Shakespeare: ~500 documents) has a validation split. Concatenating its documents
  gives back the file exactly, before whitespace-only documents are skipped (below).
- ``jsonl``: one JSON object per line; the document is the ``text_column`` field (null = none).
- ``parquet``: the string column ``text_column``, read in record batches.

A text or JSONL file may start with a UTF-8 byte-order mark, which is dropped (it is not text); a
UTF-16 or UTF-32 one is refused, naming the file and its encoding.

Split: a document is in val iff u < ``val_fraction`` where u ∈ [0, 1) is the first 8 bytes of
sha256(f"{split_seed}:" + text) read as an integer / 2⁶⁴. It depends on the text alone, so it
is deterministic, order-independent, and duplicates never straddle the split.
Whitespace-only documents are skipped (counted in corpus.json).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import glob
import hashlib
import json
import os
import platform
import re
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

from lipflow.config.runs import data_block
from lipflow.data import DataError
from lipflow.atomic import atomic_dir, is_clutter, read_json, write_json_atomic
from lipflow.errors import (ArgumentParser, ProgressClock, first_non_utf8, json_object_argument, parse_json,
                            phase_reporter, printable, run_guarded, silent, summary_of)
from lipflow.registry import Registry

PARAGRAPH_DOC_CHARS = 2_000
MAX_DOC_CHARS = 20_000
SPLITS = ("train", "val")
OUTPUTS = ("corpus.json", *(f"{s}.jsonl" for s in SPLITS))
SUMMARY_KEYS = ("name", "source", "split", "splits", "skipped_blank_documents", "config")  # of corpus.json
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")  # JSON's only way to a str that UTF-8 cannot encode


@dataclasses.dataclass(frozen=True)
class CorpusConfig:
    """The ``corpus`` config block; its defaults and rules live in the config schema and
    :func:`lipflow.config.runs.data_block_problem`."""

    name: str
    source: str
    paths: tuple[str, ...]
    text_column: str
    val_fraction: float
    split_seed: int

    @classmethod
    def from_dict(cls, block: dict[str, Any]) -> "CorpusConfig":
        """``block`` validated and filled as the config's own (:func:`lipflow.config.data_block`)."""
        values = data_block("corpus", block, DataError)
        return cls(**{**values, "paths": tuple(values["paths"])})


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise DataError(message)


class Source(NamedTuple):
    description: dict[str, Any]  # recorded in corpus.json
    label: str  # names the source in error messages
    documents: Iterator[str]


SOURCES: Registry[Callable[[CorpusConfig], Source]] = Registry("corpus source")


# the files a source reads, as a glob of a folder's: what to give for a folder named in corpus.paths
SOURCE_FILE_GLOBS = {"files": "*.txt", "jsonl": "*.jsonl", "parquet": "*.parquet"}
SOURCE_FILE_KINDS = {"files": "text", "jsonl": "JSONL", "parquet": "Parquet"}


def expand_paths(patterns: Sequence[str], source: str = "files") -> list[str]:
    """Paths and globs (``**`` recursive) → existing regular files, in order, without duplicates (one
    file however spelled, e.g. ``d/a.txt`` and ``d/../d/a.txt`` or a link to it: its first spelling).
    A pattern that names an existing file is that file, even with glob characters (``notes[1].txt``).
    A glob skips the folders it matches but refuses a link to a missing file (a moved or unmounted
    target) and a folder named like a file of ``source`` (``part.parquet/``: a dataset Spark or pandas
    wrote as a folder of parts) none of whose files it matches, which would otherwise drop their
    documents without a word."""
    files: dict[str, str] = {}  # real path → the first spelling
    for pattern in patterns:
        if glob.has_magic(pattern) and not os.path.isfile(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            dangling = next((m for m in matches if os.path.islink(m) and not os.path.exists(m)), None)
            _require(dangling is None, f"corpus.paths: glob '{pattern}' matched {dangling}, a link to a missing "
                                       "file (restore its target or remove the link)")
            named_like_a_file = next((m for m in matches if os.path.isdir(m)  # whose files the glob does not match
                                      and fnmatch.fnmatch(os.path.basename(m), SOURCE_FILE_GLOBS[source])
                                      and not any(f.startswith(m + os.sep) for f in matches)), None)
            _require(named_like_a_file is None,
                     f"corpus.paths: glob '{pattern}' matched {named_like_a_file}, a folder named like a "
                     f"{SOURCE_FILE_KINDS[source]} file (its parts?): give a glob of its files, such as "
                     f"'{os.path.join(str(named_like_a_file), SOURCE_FILE_GLOBS[source])}'")
            matches = [m for m in matches if os.path.isfile(m)]
            _require(bool(matches), f"corpus.paths: glob '{pattern}' matched no files")
        else:
            if os.path.islink(pattern) and not os.path.exists(pattern):
                raise DataError(f"corpus.paths: {pattern} is a link to {os.readlink(pattern)}, which does not resolve "
                                "to a file (a missing target or a loop of links)")
            _require(os.path.exists(pattern), f"corpus.paths: file not found: {pattern}")
            _require(
                not os.path.isdir(pattern),
                f"corpus.paths: {pattern} is a directory (give a glob such as "
                f"'{os.path.join(pattern, SOURCE_FILE_GLOBS[source])}')",
            )
            _require(os.path.isfile(pattern), f"corpus.paths: {pattern} is not a regular file (a device or pipe "
                                              "may never end)")
            matches = [pattern]
        for match in matches:
            files.setdefault(os.path.realpath(match), match)
    return list(files.values())


def _label(kind: str, files: list[str]) -> str:
    shown = ", ".join(files[:3])
    return f"{kind} {shown}" + (f" … ({len(files)} files)" if len(files) > 3 else "")


UTF8_BOM = b"\xef\xbb\xbf"  # a UTF-8 byte-order mark: what Windows editors put at a file's start, not text
# the byte-order marks of the other Unicode encodings, UTF-32's first: UTF-32LE's begins with UTF-16LE's
OTHER_BOMS = {"UTF-32": (b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff"), "UTF-16": (b"\xff\xfe", b"\xfe\xff")}


def without_bom(start: bytes, path: str) -> bytes:
    """A file's first bytes ``start`` without the UTF-8 byte-order mark they may begin with; a UTF-16 or
    UTF-32 one is a DataError naming the file and its encoding (its text would read as binary, or as not
    UTF-8)."""
    for encoding, marks in OTHER_BOMS.items():
        if start.startswith(marks):
            raise DataError(f"{path}: {encoding} text (it starts with a {encoding} byte-order mark): convert it to "
                            f"UTF-8, e.g. iconv -f {encoding} -t UTF-8")
    return start[len(UTF8_BOM):] if start.startswith(UTF8_BOM) else start


def decode_utf8(data: bytes, where: str, offset: int = 0) -> str:
    """Strict UTF-8 decode of ``data`` (which starts at byte ``offset`` of ``where``; at 0 without a
    byte-order mark, :func:`without_bom`); a NUL byte (a binary file) or an invalid sequence is a
    DataError naming the byte offset."""
    if offset == 0:
        body = without_bom(data, where)
        data, offset = body, len(data) - len(body)
    nul = data.find(b"\0")
    if nul >= 0:
        raise DataError(f"{where}: binary file (NUL byte at byte offset {offset + nul})")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{where}: not UTF-8 (invalid byte 0x{data[e.start]:02x} at byte offset {offset + e.start})"
        ) from None


@SOURCES.register("embedded")
def embedded_source(cfg: CorpusConfig) -> Source:
    from pydoc_data import topics

    names = sorted(topics.topics)
    description = {
        "kind": "embedded",
        "module": "pydoc_data.topics",
        "python": platform.python_version(),
        "documents": len(names),
    }
    return Source(description, "embedded pydoc_data.topics", (topics.topics[n] for n in names))


def _paragraph_documents(path: str) -> Iterator[str]:
    """Cut one text file into runs of whole paragraphs (the rule in the module docstring)."""
    lines: list[str] = []
    size = offset = 0
    with open(path, "rb") as f:
        for raw in f:
            line = decode_utf8(raw, path, offset)
            offset += len(raw)
            lines.append(line)
            size += len(line)
            if (size >= PARAGRAPH_DOC_CHARS and not line.strip()) or size >= MAX_DOC_CHARS:
                yield "".join(lines)
                lines, size = [], 0
    if lines:
        yield "".join(lines)


def _file_documents(files: list[str]) -> Iterator[str]:
    for path in files:
        with open(path, "rb") as f:
            yield decode_utf8(f.read(), path)


@SOURCES.register("files")
def files_source(cfg: CorpusConfig) -> Source:
    files = expand_paths(cfg.paths, cfg.source)
    single = len(files) == 1
    description = {
        "kind": "files",
        "files": files,
        "documents_per_file": f"paragraph groups of >= {PARAGRAPH_DOC_CHARS} chars" if single else "one",
    }
    documents = _paragraph_documents(files[0]) if single else _file_documents(files)
    return Source(description, _label("files", files), documents)


def _jsonl_documents(files: list[str], column: str) -> Iterator[str]:
    quoted = json.dumps(column, ensure_ascii=False).encode("utf-8")  # the key as a line spells it (mostly)
    for path in files:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                where = f"{path}:{lineno}"
                if lineno == 1:
                    raw = without_bom(raw, path)
                if not raw.strip():
                    continue
                try:
                    record = parse_json(raw.decode("utf-8"))
                except UnicodeDecodeError as e:
                    bad = f"invalid byte 0x{raw[e.start]:02x} at column {e.start + 1}"
                    raise DataError(f"{where}: not UTF-8 ({bad})") from None
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: malformed JSON line ({e.msg} at column {e.colno})") from None
                if not isinstance(record, dict):
                    raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
                if column not in record:
                    raise DataError(f"{where}: missing text column '{column}' (keys: {', '.join(record) or 'none'})")
                if raw.count(quoted) > 1 and (copies := key_count(raw, column)) > 1:  # json.loads keeps the last
                    raise DataError(f"{where}: text column '{column}' appears {copies} times in the record (keep one)")
                text = record[column]
                if text is None:
                    continue
                if not isinstance(text, str):
                    raise DataError(f"{where}: text column '{column}' holds {type(text).__name__}, expected a string")
                if SURROGATE_ESCAPE.search(raw):
                    _require_encodable(text, f"{where}: text column '{column}'")
                yield text


def key_count(raw: bytes, key: str) -> int:
    """How many times the JSON object of the line ``raw`` names ``key`` at its top level (``json.loads``
    keeps the last value of a repeated key, so the other would vanish from the corpus without a word)."""
    pairs = json.loads(raw, object_pairs_hook=lambda pairs: pairs)
    return sum(name == key for name, _ in pairs)


def _require_encodable(text: str, where: str) -> None:
    """A DataError naming ``where`` when ``text`` holds a lone surrogate (an escape such as
    ``\\ud800`` in JSON), which is no Unicode character and has no UTF-8 encoding."""
    if (start := first_non_utf8(text)) is not None:
        raise DataError(f"{where} holds a lone surrogate \\u{ord(text[start]):04x} at character {start + 1}, "
                        "which is not a Unicode character (UTF-8 cannot encode it)")


@SOURCES.register("jsonl")
def jsonl_source(cfg: CorpusConfig) -> Source:
    files = expand_paths(cfg.paths, cfg.source)
    description = {"kind": "jsonl", "files": files, "text_column": cfg.text_column}
    return Source(description, _label("jsonl", files), _jsonl_documents(files, cfg.text_column))


def _parquet_documents(files: list[str], column: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    for path in files:
        try:
            parquet = pq.ParquetFile(path)
            schema = parquet.schema_arrow
            if column not in schema.names:
                raise DataError(f"{path}: missing text column '{column}' (columns: {', '.join(schema.names)})")
            copies = len(schema.get_all_field_indices(column))
            if copies > 1:  # schema.field would raise a KeyError naming no file
                raise DataError(f"{path}: text column '{column}' appears {copies} times (rename all but one)")
            kind = schema.field(column).type
            # a dictionary-encoded string column (pandas' 'category' dtype) holds strings too
            values = kind.value_type if pa.types.is_dictionary(kind) else kind
            # a column of nulls only (pandas writes an all-None column so) holds no documents, as nulls elsewhere
            if not (pa.types.is_string(values) or pa.types.is_large_string(values) or pa.types.is_string_view(values)
                    or pa.types.is_null(values)):
                raise DataError(f"{path}: text column '{column}' has type {kind}, expected a string column")
            row = 0
            for batch in parquet.iter_batches(batch_size=1024, columns=[column]):
                try:
                    texts = batch.column(0).to_pylist()
                except UnicodeDecodeError:
                    raise DataError(f"{path}: text column '{column}' is not UTF-8 "
                                    f"(row {row + _first_invalid_row(batch.column(0))})") from None
                yield from (text for text in texts if text is not None)
                row += batch.num_rows
        except pa.ArrowException as e:
            raise DataError(f"{path}: unreadable Parquet file ({str(e).splitlines()[0]})") from None


def _first_invalid_row(column: Any) -> int:
    """The index of the first value of a string ``column`` that is not valid UTF-8."""
    for index in range(len(column)):
        try:
            column[index].as_py()
        except UnicodeDecodeError:
            return index
    return 0


@SOURCES.register("parquet")
def parquet_source(cfg: CorpusConfig) -> Source:
    files = expand_paths(cfg.paths, cfg.source)
    description = {"kind": "parquet", "files": files, "text_column": cfg.text_column}
    return Source(description, _label("parquet", files), _parquet_documents(files, cfg.text_column))


def split_of(text: str, val_fraction: float, split_seed: int) -> str:
    """'val' iff int(sha256(f"{split_seed}:" + text)[:8 bytes]) / 2⁶⁴ < val_fraction, else 'train'."""
    digest = hashlib.sha256(f"{split_seed}:{text}".encode("utf-8")).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"


def not_a_corpus(folder: Path) -> str | None:
    """Why ``folder`` (holding only names the stage writes) is not an earlier output of this stage,
    or None when it is one or what Snakemake leaves of one (it deletes the three files before a
    rerun): every file is a regular file, and a JSONL file stands beside a corpus.json of the keys
    :func:`build_corpus` writes and starts with a ``{"text": …}`` line of its own."""
    names = sorted(entry.name for entry in folder.iterdir() if not is_clutter(entry.name))
    for name in names:
        if (folder / name).is_symlink() or not (folder / name).is_file():
            return f"{name} is not a regular file"
    if names and "corpus.json" not in names:
        return f"it holds {names[0]} but no corpus.json"
    if "corpus.json" in names:
        try:
            summary = read_json(folder / "corpus.json")
        except ValueError:
            return "its corpus.json is not valid JSON"
        missing = [key for key in SUMMARY_KEYS if key not in summary]
        if missing:
            return f"its corpus.json has no '{missing[0]}'"
    for name in names:
        if name.endswith(".jsonl"):
            with open(folder / name, "rb") as f:
                first = f.readline()
            try:
                record = parse_json(first)
            except (json.JSONDecodeError, UnicodeDecodeError):
                record = None
            if not (isinstance(record, dict) and list(record) == ["text"] and isinstance(record["text"], str)):
                return f'{name} does not start with a line {{"text": …}} of this stage'
    return None


def build_corpus(cfg: CorpusConfig, out_dir: str | os.PathLike[str],
                 report: Callable[[str], None] = silent) -> dict[str, Any]:
    """Stream the source's documents into ``out_dir/{train,val}.jsonl`` and write corpus.json;
    returns the corpus.json contents. ``out_dir`` is replaced atomically, or untouched on error.
    ``report`` gets the documents and MB written so far when :class:`ProgressClock` says so."""
    source = SOURCES.get(cfg.source)(cfg)
    counts = {split: {"documents": 0, "chars": 0, "bytes": 0} for split in SPLITS}
    skipped = 0
    with atomic_dir(out_dir, owned=OUTPUTS, flag="--out-dir", ours=not_a_corpus) as tmp:
        with contextlib.ExitStack() as stack:
            outputs = {s: stack.enter_context(open(tmp / f"{s}.jsonl", "w", encoding="utf-8")) for s in SPLITS}
            report(f"reading {source.label}")
            clock = ProgressClock()
            for text in source.documents:
                if clock.due():
                    report(f"{sum(c['documents'] for c in counts.values()):,} documents, "
                           f"{sum(c['bytes'] for c in counts.values()) / 1e6:.2f} MB so far from {source.label}")
                if not text.strip():
                    skipped += 1
                    continue
                split = split_of(text, cfg.val_fraction, cfg.split_seed)
                outputs[split].write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                count = counts[split]
                count["documents"] += 1
                count["chars"] += len(text)
                count["bytes"] += len(text.encode("utf-8"))
        n_train, n_val = counts["train"]["documents"], counts["val"]["documents"]
        total = n_train + n_val
        _require(total > 0, f"empty corpus: {source.label} holds no non-whitespace text")
        # one document fills one split whatever the fraction or seed: say why there is only one
        one_document = (f" (a single file is cut into documents at the first blank line after {PARAGRAPH_DOC_CHARS:,} "
                        f"characters, or at the first line end after {MAX_DOC_CHARS:,}: this one gives one document)"
                        if total < 2 and source.description["kind"] == "files" and len(source.description["files"]) == 1
                        else "")
        _require(
            n_val > 0,
            f"val split is empty (0 of {total} documents): raise corpus.val_fraction "
            f"(now {cfg.val_fraction}), change corpus.split_seed, or add documents" + one_document,
        )
        _require(
            n_train > 0,
            f"train split is empty (all {total} documents went to val): lower corpus.val_fraction "
            f"(now {cfg.val_fraction}), change corpus.split_seed, or add documents" + one_document,
        )
        summary = {
            "name": cfg.name,
            "source": source.description,
            "split": {
                "rule": "val iff int(sha256(f'{split_seed}:' + text)[:8]) / 2**64 < val_fraction",
                "val_fraction": cfg.val_fraction,
                "split_seed": cfg.split_seed,
            },
            "splits": counts,
            "skipped_blank_documents": skipped,
            "config": dataclasses.asdict(cfg),
        }
        write_json_atomic(tmp / "corpus.json", summary)
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m lipflow.data.corpus", description=summary_of(__doc__))
    parser.add_argument("--config-json", required=True, help="the 'corpus' config block as JSON")
    parser.add_argument("--out-dir", required=True, type=Path, help="output directory (replaced atomically)")
    args = parser.parse_args(argv)
    cfg = CorpusConfig.from_dict(json_object_argument(args.config_json, "--config-json"))
    summary = build_corpus(cfg, args.out_dir, phase_reporter("corpus"))
    splits = summary["splits"]
    print(printable(
        f"corpus '{cfg.name}': {splits['train']['documents']} train / {splits['val']['documents']} val documents "
        f"({splits['train']['bytes'] / 1e6:.2f} / {splits['val']['bytes'] / 1e6:.2f} MB) → {args.out_dir}"
    ))


if __name__ == "__main__":
    raise SystemExit(run_guarded(main))

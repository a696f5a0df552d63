"""Data stages: corpus sources and split, tokenizers and shards, the memory-mapped loader, bad input."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest
import torch
from pydoc_data import topics
from tokenizers import Tokenizer, models

from lipflow.config import ConfigError, check_config, load_schema
from lipflow.data import DataError
from lipflow.data.corpus import PARAGRAPH_DOC_CHARS, CorpusConfig, _paragraph_documents, build_corpus, split_of
from lipflow.data.loader import TokenShards, load_tokenizer
from lipflow.data.tokenize import (EOT, UNK, CharTable, TokenizerConfig, batched, end_of_text, flat_ids, token_dtype,
                                    tokenize_corpus)

TINY_SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"  # ../shared
TOPICS = [topics.topics[name] for name in sorted(topics.topics)]  # real English prose, 79 documents


def read_jsonl(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


def corpus_texts(out: Path) -> tuple[list[str], list[str]]:
    return read_jsonl(out / "train.jsonl"), read_jsonl(out / "val.jsonl")


def make_corpus_dir(root: Path, train: list[str], val: list[str]) -> Path:
    """A corpus-stage output with exactly these documents (to control what lands in each split)."""
    root.mkdir(parents=True)
    for split, docs in (("train", train), ("val", val)):
        with open(root / f"{split}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    splits = {s: {"documents": len(d), "chars": sum(map(len, d)), "bytes": sum(len(x.encode()) for x in d)}
              for s, d in (("train", train), ("val", val))}
    (root / "corpus.json").write_text(json.dumps({"name": "t", "source": {"kind": "test"}, "splits": splits}))
    return root


def shard_stream(out: Path, split: str) -> np.ndarray:
    """A split's token stream read with plain (non-mmap) pyarrow reads: the loader's reference."""
    manifest = json.loads((out / "manifest.json").read_text())
    parts = [ipc.open_file(str(out / s["file"])).read_all().column("tokens").to_numpy()
             for s in manifest["splits"][split]["shards"]]
    return np.concatenate(parts)


def direct_stream(tokenizer: Tokenizer, docs: list[str], eot_id: int) -> list[int]:
    """Each document encoded on its own with ``encode``, followed by the end-of-text id."""
    out: list[int] = []
    for doc in docs:
        out += tokenizer.encode(doc, add_special_tokens=False).ids + [eot_id]
    return out


# ---------------------------------------------------------------- config blocks


DATA_CONFIGS = {"corpus": CorpusConfig, "tokenizer": TokenizerConfig}


@pytest.mark.parametrize("block", list(DATA_CONFIGS))
def test_the_schema_is_the_one_owner_of_the_data_blocks_defaults(block):
    config_class = DATA_CONFIGS[block]
    fields = dataclasses.fields(config_class)
    assert all(f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING for f in fields)
    properties = load_schema()["properties"][block]["properties"]
    assert {f.name for f in fields} == set(properties)
    filled = config_class.from_dict({})
    for key, spec in properties.items():
        default = tuple(spec["default"]) if isinstance(spec["default"], list) else spec["default"]
        assert getattr(filled, key) == default, key


@pytest.mark.parametrize(("block", "values", "expected"), [
    ("corpus", {"source": "embedded", "paths": ["x.txt"]}, "corpus.paths must be empty for corpus.source 'embedded'"),
    ("corpus", {"source": "parquet"}, "corpus.paths is empty; corpus.source 'parquet' needs a path or glob"),
    ("tokenizer", {"kind": "file"}, "tokenizer.path is required when tokenizer.kind is 'file'"),
    ("corpus", {"val_fraction": 0}, "corpus.val_fraction: 0 is less than or equal to the minimum of 0"),
    ("corpus", {"name": "a/b"}, "corpus.name: 'a/b' is not allowed"),
    ("tokenizer", {"batch_docs": 0}, "tokenizer.batch_docs: 0 is less than the minimum of 1"),
])
def test_a_stage_refuses_a_data_block_as_the_config_check_does(block, values, expected):
    with pytest.raises(DataError) as stage:
        DATA_CONFIGS[block].from_dict(values)
    with pytest.raises(ConfigError) as config:
        check_config({block: values})
    assert str(stage.value).startswith(expected)
    assert str(config.value) == f"config error: {stage.value}"


# ---------------------------------------------------------------- corpus sources


def test_embedded_source_is_the_pydoc_topics(tmp_path):
    summary = build_corpus(CorpusConfig.from_dict({"name": "pydoc"}), tmp_path / "c")
    train, val = corpus_texts(tmp_path / "c")
    assert sorted(train + val) == sorted(t for t in TOPICS if t.strip())
    for split, docs in (("train", train), ("val", val)):
        assert summary["splits"][split] == {"documents": len(docs), "chars": sum(map(len, docs)),
                                            "bytes": sum(len(d.encode()) for d in docs)}
    assert json.loads((tmp_path / "c" / "corpus.json").read_text()) == json.loads(json.dumps(summary))


def test_files_source_one_document_per_file_through_a_glob(tmp_path):
    docs = TOPICS[:30]
    for i, doc in enumerate(docs):
        (tmp_path / f"doc{i:02d}.txt").write_text(doc, encoding="utf-8")
    (tmp_path / "ignored.md").write_text("not matched by the glob")
    cfg = CorpusConfig.from_dict({"source": "files", "paths": [str(tmp_path / "*.txt")], "val_fraction": 0.3})
    build_corpus(cfg, tmp_path / "c")
    train, val = corpus_texts(tmp_path / "c")
    assert sorted(train + val) == sorted(docs)


def test_corpus_progress_lines_count_the_documents_and_bytes_written(tmp_path, monkeypatch):
    """With PROGRESS_SECONDS = 0 the corpus stage reports before each document the documents and MB written
    so far (blank ones are skipped, not counted), ending one document short of corpus.json's totals."""
    import lipflow.errors

    docs = [*TOPICS[:6], " \n", *TOPICS[6:9]]
    for i, doc in enumerate(docs):
        (tmp_path / f"doc{i:02d}.txt").write_text(doc, encoding="utf-8")
    cfg = CorpusConfig.from_dict({"source": "files", "paths": [str(tmp_path / "*.txt")], "val_fraction": 0.3})
    lines: list[str] = []
    monkeypatch.setattr(lipflow.errors, "PROGRESS_SECONDS", 0.0)
    summary = build_corpus(cfg, tmp_path / "c", lines.append)
    assert lines[0] == "reading files " + ", ".join(f"{tmp_path}/doc0{i}.txt" for i in range(3)) + " … (10 files)"
    counts = [re.fullmatch(r"([\d,]+) documents, (\d+\.\d\d) MB so far from files .*", line).groups()
              for line in lines[1:]]
    assert len(counts) == len(docs)
    written = [sum(len(d.encode()) for d in docs[:i] if d.strip()) for i in range(len(docs))]
    assert counts == [(str(sum(1 for d in docs[:i] if d.strip())), f"{written[i] / 1e6:.2f}") for i in range(len(docs))]
    total = summary["splits"]["train"]["bytes"] + summary["splits"]["val"]["bytes"]
    assert total == written[-1] + len(docs[-1].encode())


@pytest.mark.parametrize("spelling", [".", "./", "sub/.."])
def test_out_dir_spelled_as_dot_or_dot_dot_is_refused_before_any_work(tmp_path, monkeypatch, spelling):
    """``--out-dir .`` (say an empty folder) names the folder without its name: the temporary sibling was made
    inside it, and after all the work the stage refused its own temporary as a user's file
    ("holds '..tmp-…', which this stage does not write"). Now one line says so before any work."""
    (tmp_path / "sub").mkdir()
    corpus = make_corpus_dir(tmp_path / "c", TOPICS[:4], TOPICS[4:6])
    monkeypatch.chdir(tmp_path / "sub" if spelling != "sub/.." else tmp_path)
    read: list[str] = []
    cfg = CorpusConfig.from_dict({"source": "files", "paths": [str(TINY_SHAKESPEARE)]})
    with pytest.raises(ValueError, match=r"^--out-dir (sub/)?\.{1,2} names a folder as '\.' or '\.\.': give a path "
                                         r"ending in the folder's name"):
        build_corpus(cfg, spelling, read.append)
    assert read == []  # refused before reading anything
    assert not any(p.name.startswith(".") for p in tmp_path.rglob("*"))  # no temporary anywhere
    code = subprocess.run([sys.executable, "-m", "lipflow.data.tokenize", "--corpus-dir", str(corpus),
                           "--config-json", "{}", "--out-dir", spelling], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert code.returncode == 2 and code.stderr.startswith("lipflow: error: --out-dir ") and \
        len(code.stderr.splitlines()) == 1, code.stderr


def test_a_file_name_that_is_not_utf8_is_written_escaped_in_the_progress_lines(tmp_path):
    """A file name that is not UTF-8 (byte 0xff) reaches Python as a lone surrogate; under a UTF-8 locale
    stdout is strict, and the stage's first progress line ("reading files …") raised on it: the corpus
    failed with "lipflow: error: 'utf-8' codec can't encode character '\\udcff'…", naming no file."""
    (tmp_path / os.fsdecode(b"\xff.txt")).write_text(TINY_SHAKESPEARE.read_text(encoding="utf-8"), encoding="utf-8")
    cfg = {"name": "latin", "source": "files", "paths": [str(tmp_path / "*.txt")]}
    done = subprocess.run([sys.executable, "-m", "lipflow.data.corpus", "--config-json", json.dumps(cfg),
                           "--out-dir", str(tmp_path / "c")], capture_output=True, text=True,
                          env={**os.environ, "PYTHONIOENCODING": "utf-8",  # strict, as under en_US.UTF-8
                               "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"corpus: reading files {tmp_path}/\\udcff.txt (")
    assert len(read_jsonl(tmp_path / "c" / "train.jsonl")) > 100


def test_an_out_dir_name_that_is_not_utf8_is_written_escaped_or_refused(tmp_path):
    """The corpus stage's closing line names its --out-dir: one that is not UTF-8 raised on a strict stdout after
    the folder was complete (exit 2, "'utf-8' codec can't encode …"; Snakemake would delete the outputs). The
    tokenize stage failed the same way at tokenizer.save after fitting (tokenizers takes UTF-8 paths only, and
    so does the loader): it is now refused before any work, naming the option."""
    out = tmp_path / os.fsdecode(b"\xff")
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    corpus = subprocess.run([sys.executable, "-m", "lipflow.data.corpus", "--config-json", "{}", "--out-dir",
                             str(out / "c")], capture_output=True, text=True, env=env)
    assert corpus.returncode == 0, corpus.stderr
    assert corpus.stdout.splitlines()[-1].endswith(f"→ {tmp_path}/\\udcff/c")
    tokens = subprocess.run([sys.executable, "-m", "lipflow.data.tokenize", "--corpus-dir", str(out / "c"),
                             "--config-json", "{}", "--out-dir", str(out / "t")],
                            capture_output=True, text=True, env=env)
    assert tokens.returncode == 2 and tokens.stdout == "", tokens.stdout
    assert tokens.stderr == "lipflow: error: --out-dir is not valid UTF-8 text (at byte " \
                            f"{len(str(tmp_path).encode()) + 1})\n"
    assert sorted(p.name for p in out.iterdir()) == ["c"]


@pytest.mark.parametrize("source", ["one file", "files", "jsonl"])
def test_a_utf8_byte_order_mark_is_no_text_and_a_utf16_file_is_named(tmp_path, source):
    """A file that starts with a UTF-8 byte-order mark (as Windows editors write) gives the documents of
    the same file without it: the mark is not text (it became a U+FEFF token at the first document's
    start). A UTF-16 file (its mark: FF FE) is refused naming the file and the encoding, not as binary."""
    docs = TOPICS[:3] if source != "one file" else ["\n\n".join(TOPICS[:3])]
    kind = "jsonl" if source == "jsonl" else "files"

    def corpus(folder: str, encode) -> list[str]:
        (tmp_path / folder).mkdir()
        if kind == "jsonl":
            (tmp_path / folder / "a.jsonl").write_bytes(encode("".join(json.dumps({"text": d}) + "\n" for d in docs)))
        else:
            for i, doc in enumerate(docs):
                (tmp_path / folder / f"d{i}.txt").write_bytes(encode(doc))
        cfg = CorpusConfig.from_dict({"source": kind, "paths": [str(tmp_path / folder / "*")], "val_fraction": 0.3})
        build_corpus(cfg, tmp_path / folder / "out")
        return sorted(sum(corpus_texts(tmp_path / folder / "out"), []))

    plain = corpus("plain", lambda text: text.encode())
    assert corpus("bom", lambda text: b"\xef\xbb\xbf" + text.encode()) == plain
    assert not any("\ufeff" in text for text in plain)
    for encoding in ("UTF-16", "UTF-32"):  # UTF-32LE's mark begins with UTF-16LE's: it was called UTF-16
        with pytest.raises(DataError, match=rf"^/.*/(a\.jsonl|d0\.txt): {encoding} text \(it starts with a {encoding} "
                                            rf"byte-order mark\): convert it to UTF-8, e\.g\. iconv -f {encoding} -t UTF-8$"):
            corpus(encoding, lambda text: text.encode(encoding))


def test_a_byte_order_mark_shifts_no_byte_offset_of_an_error(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"\xef\xbb\xbfok line\nna\xefve\n")
    with pytest.raises(DataError, match=r"a\.txt: not UTF-8 \(invalid byte 0xef at byte offset 13\)$"):
        build_corpus(CorpusConfig.from_dict({"source": "files", "paths": [str(path)]}), tmp_path / "c")


def test_a_file_named_with_glob_characters_is_that_file(tmp_path):
    # 'notes[1].txt' as a glob matches 'notes1.txt' only: the file itself was refused ("matched no files")
    from lipflow.data.corpus import expand_paths

    write(tmp_path / "notes[1].txt", "mine")
    write(tmp_path / "other.txt", "more")
    assert expand_paths([str(tmp_path / "notes[1].txt"), str(tmp_path / "*.txt")]) == [
        str(tmp_path / "notes[1].txt"), str(tmp_path / "other.txt")]


def test_a_glob_matching_a_link_to_a_missing_file_is_refused_not_skipped(tmp_path):
    # a link whose target moved (or sits on an unmounted drive) was skipped like a folder: its document
    # vanished from the corpus without a word
    from lipflow.data.corpus import expand_paths

    write(tmp_path / "a.txt", "kept")
    (tmp_path / "b.txt").symlink_to(tmp_path / "moved" / "b.txt")
    with pytest.raises(DataError, match=r"^corpus\.paths: glob '.*\*\.txt' matched .*b\.txt, a link to a missing "
                                        r"file \(restore its target or remove the link\)$"):
        expand_paths([str(tmp_path / "*.txt")])
    (tmp_path / "b.txt").unlink()
    assert expand_paths([str(tmp_path / "*.txt")]) == [str(tmp_path / "a.txt")]


@pytest.mark.parametrize("source, suffix, kind", [("files", ".txt", "text"), ("jsonl", ".jsonl", "JSONL"),
                                                 ("parquet", ".parquet", "Parquet")])
def test_a_glob_matching_a_folder_named_like_its_sources_file_is_refused_not_skipped(tmp_path, source, suffix, kind):
    # a dataset written as a folder of parts (Spark's part.parquet/part-0.parquet) was skipped like any
    # folder a glob matches: its documents vanished from the corpus without a word
    from lipflow.data.corpus import expand_paths

    (tmp_path / "data" / f"b{suffix}").mkdir(parents=True)
    write(tmp_path / "data" / f"a{suffix}", "kept")
    write(tmp_path / "data" / f"b{suffix}" / f"part-0{suffix}", "dropped")
    (tmp_path / "data" / "notes").mkdir()  # a folder named like no file of the source is still skipped
    folder = tmp_path / "data" / f"b{suffix}"
    with pytest.raises(DataError, match=re.escape(f"corpus.paths: glob '{tmp_path}/data/*' matched {folder}, a folder "
                                                  f"named like a {kind} file (its parts?): give a glob of its "
                                                  f"files, such as '{folder}/*{suffix}'")):
        expand_paths([str(tmp_path / "data" / "*")], source)
    # a recursive glob that matches the folder's files as well takes them
    assert expand_paths([str(tmp_path / "data" / "**" / f"*{suffix}")], source) == [
        str(tmp_path / "data" / f"a{suffix}"), str(folder / f"part-0{suffix}")]


@pytest.mark.parametrize("source, example", [("files", "*.txt"), ("jsonl", "*.jsonl"), ("parquet", "*.parquet")])
def test_a_folder_named_in_paths_is_refused_with_a_glob_of_its_sources_files(tmp_path, source, example):
    # the hint said '<folder>/*.txt' for every source, a glob that gives a JSONL or Parquet corpus no file
    (tmp_path / "data").mkdir()
    folder = str(tmp_path / "data")
    with pytest.raises(DataError, match=re.escape(f"corpus.paths: {folder} is a directory (give a glob such as "
                                                  f"'{folder}/{example}')")):
        build_corpus(CorpusConfig.from_dict({"source": source, "paths": [folder]}), tmp_path / "c")


def test_a_jsonl_record_naming_its_text_column_inside_its_text_or_a_nested_object_is_read(tmp_path):
    """Only a repeated top-level key is refused: the column's name quoted in the text, or as a key of a
    nested object, is no second copy."""
    from lipflow.data.corpus import _jsonl_documents

    line = {"text": 'she said "text" twice: "text"', "meta": {"text": "nested"}}
    path = write(tmp_path / "a.jsonl", json.dumps(line) + "\n")
    assert list(_jsonl_documents([path], "text")) == [line["text"]]


def test_single_file_is_cut_into_paragraph_groups_that_rebuild_it(tmp_path):
    text = "\n\n".join(TOPICS)
    path = tmp_path / "book.txt"
    path.write_text(text, encoding="utf-8")
    docs = list(_paragraph_documents(str(path)))
    assert "".join(docs) == text
    assert len(docs) > 100
    for doc in docs[:-1]:
        assert len(doc) >= PARAGRAPH_DOC_CHARS and doc.endswith("\n") and doc.splitlines()[-1].strip() == ""
    build_corpus(CorpusConfig.from_dict({"source": "files", "paths": [str(path)]}), tmp_path / "c")
    train, val = corpus_texts(tmp_path / "c")
    assert sorted(train + val) == sorted(d for d in docs if d.strip()) and val and train


@pytest.mark.skipif(not TINY_SHAKESPEARE.exists(), reason="Tiny Shakespeare is not on this machine")
def test_tiny_shakespeare_single_file_builds_both_splits(tmp_path):
    cfg = CorpusConfig.from_dict({"source": "files", "paths": [str(TINY_SHAKESPEARE)]})
    summary = build_corpus(cfg, tmp_path / "c")
    counts = summary["splits"]
    assert counts["train"]["chars"] + counts["val"]["chars"] == len(TINY_SHAKESPEARE.read_text(encoding="utf-8"))
    assert counts["val"]["documents"] >= 20 and counts["train"]["documents"] >= 200


def test_jsonl_source_reads_the_named_column(tmp_path):
    docs = TOPICS[:40]
    with open(tmp_path / "a.jsonl", "w") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": i, "body": d}) + "\n")
        f.write("\n" + json.dumps({"id": -1, "body": None}) + "\n")  # blank line and null: no document
    cfg = CorpusConfig.from_dict({"source": "jsonl", "paths": [str(tmp_path / "a.jsonl")], "text_column": "body"})
    build_corpus(cfg, tmp_path / "c")
    train, val = corpus_texts(tmp_path / "c")
    assert sorted(train + val) == sorted(docs)


def test_jsonl_line_with_an_overlong_integer_is_named(tmp_path):
    # json.loads raises a bare ValueError past Python's 4,300-digit int limit: one line naming no file
    write(tmp_path / "a.jsonl", json.dumps({"text": "fine"}) + "\n" + '{"text": "x", "id": ' + "1" * 5000 + "}\n")
    cfg = CorpusConfig.from_dict({"source": "jsonl", "paths": [str(tmp_path / "a.jsonl")]})
    with pytest.raises(DataError, match=r"a\.jsonl:2: malformed JSON line \(number too long to read"):
        build_corpus(cfg, tmp_path / "c")
    assert not (tmp_path / "c").exists()

def test_parquet_source_streams_the_named_column(tmp_path):
    docs = TOPICS[:50]
    table = pa.table({"id": list(range(len(docs) + 1)), "body": docs + [None]})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=7)
    cfg = CorpusConfig.from_dict({"source": "parquet", "paths": [str(tmp_path / "*.parquet")], "text_column": "body"})
    build_corpus(cfg, tmp_path / "c")
    train, val = corpus_texts(tmp_path / "c")
    assert sorted(train + val) == sorted(docs)


def test_parquet_source_reads_a_dictionary_encoded_string_column(tmp_path):
    # pandas writes a 'category' column as a dictionary<values=string> column: strings, like any other
    docs = TOPICS[:30]
    table = pa.table({"body": pa.array(docs + [None] + docs[:3]).dictionary_encode()})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=7)
    assert pa.types.is_dictionary(pq.ParquetFile(tmp_path / "a.parquet").schema_arrow.field("body").type)
    cfg = CorpusConfig.from_dict({"source": "parquet", "paths": [str(tmp_path / "a.parquet")], "text_column": "body"})
    build_corpus(cfg, tmp_path / "c")
    train, val = corpus_texts(tmp_path / "c")
    assert sorted(train + val) == sorted(docs + docs[:3])
    table = pa.table({"body": pa.array([1, 2, 3]).dictionary_encode()})
    pq.write_table(table, tmp_path / "n.parquet")
    cfg = CorpusConfig.from_dict({"source": "parquet", "paths": [str(tmp_path / "n.parquet")], "text_column": "body"})
    with pytest.raises(DataError, match=r"n\.parquet: text column 'body' has type .*expected a string column"):
        build_corpus(cfg, tmp_path / "d")


def test_parquet_source_skips_a_column_of_nulls_only(tmp_path):
    # pandas writes a column of None only with Arrow type null: no documents, as nulls in a string column
    # (was refused as "has type null, expected a string column", stopping a corpus of many files)
    pq.write_table(pa.table({"body": pa.nulls(3)}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"body": TOPICS[:30]}), tmp_path / "b.parquet")
    cfg = CorpusConfig.from_dict({"source": "parquet", "paths": [str(tmp_path / "*.parquet")], "text_column": "body"})
    build_corpus(cfg, tmp_path / "c")
    train, val = corpus_texts(tmp_path / "c")
    assert sorted(train + val) == sorted(TOPICS[:30])

def test_parquet_source_refuses_a_text_column_that_appears_twice(tmp_path):
    # Parquet allows two columns of one name; which is the text is not ours to guess (was a KeyError
    # 'Column body does not exist in schema' naming no file)
    table = pa.table([pa.array(TOPICS[:5]), pa.array(TOPICS[5:10])], names=["body", "body"])
    pq.write_table(table, tmp_path / "a.parquet")
    cfg = CorpusConfig.from_dict({"source": "parquet", "paths": [str(tmp_path / "a.parquet")], "text_column": "body"})
    with pytest.raises(DataError, match=r"a\.parquet: text column 'body' appears 2 times"):
        build_corpus(cfg, tmp_path / "c")
    assert not (tmp_path / "c").exists()


# ---------------------------------------------------------------- split


def test_split_is_deterministic_disjoint_order_free_and_seeded(tmp_path):
    docs = [f"document {i}: " + TOPICS[i % len(TOPICS)][:200] for i in range(300)]
    for i, d in enumerate(docs):
        (tmp_path / f"{i:03d}.txt").write_text(d)
    paths = [str(tmp_path / f"{i:03d}.txt") for i in range(300)]
    cfg = CorpusConfig.from_dict({"source": "files", "paths": paths, "val_fraction": 0.2})
    build_corpus(cfg, tmp_path / "a")
    build_corpus(cfg, tmp_path / "again")
    build_corpus(dataclasses.replace(cfg, paths=tuple(reversed(paths))), tmp_path / "reversed")
    build_corpus(dataclasses.replace(cfg, split_seed=1), tmp_path / "s")
    for split in ("train.jsonl", "val.jsonl"):
        assert (tmp_path / "a" / split).read_bytes() == (tmp_path / "again" / split).read_bytes()
    train_a, val_a = corpus_texts(tmp_path / "a")
    train_b, val_b = corpus_texts(tmp_path / "reversed")
    assert set(val_a) == set(val_b) and set(train_a) == set(train_b)
    assert not set(train_a) & set(val_a) and sorted(train_a + val_a) == sorted(docs)
    assert set(corpus_texts(tmp_path / "s")[1]) != set(val_a)  # another seed, another split


def test_split_fraction_is_honoured_on_many_documents():
    n, fraction = 4000, 0.3
    val = sum(split_of(f"doc {i}", fraction, 7) == "val" for i in range(n))
    sigma = (n * fraction * (1 - fraction)) ** 0.5
    assert abs(val - n * fraction) < 4 * sigma


# ---------------------------------------------------------------- tokenizers and shards


@pytest.mark.parametrize("kind", ["char", "bpe"])
@pytest.mark.parametrize("split, line, pattern", [
    ("val", b'{"text": "a\\ud800b"}\n', r"val\.jsonl:3: not a corpus-stage line"),
    ("train", b'{"text": "a\\udc00b"}\n', r"train\.jsonl:3: not a corpus-stage line"),
    ("val", b'{"text": "caf\xe9"}\n', r"val\.jsonl: not UTF-8"),
])
def test_a_corpus_line_no_tokenizer_can_take_is_named(tmp_path, kind, split, line, pattern):
    """A corpus JSONL (edited by hand) with a lone surrogate escape or bytes that are not UTF-8 is one
    error naming the file, not a TypeError from the tokenizers library or a bare UnicodeDecodeError."""
    corpus = make_corpus_dir(tmp_path / "c", TOPICS[:2], TOPICS[2:4])
    with open(corpus / f"{split}.jsonl", "ab") as f:
        f.write(line)
    with pytest.raises(DataError, match=pattern):
        tokenize_corpus(TokenizerConfig.from_dict({"kind": kind, "vocab_size": 260}), corpus, tmp_path / "t")
    assert not (tmp_path / "t").exists()

def test_char_tokenizer_round_trips_and_maps_unseen_val_chars_to_unk(tmp_path):
    train, val = TOPICS[:20], ["caf\u00e9 \u00a7 \u4e2d", TOPICS[30]]
    assert not {"\u00a7", "\u4e2d"} & set("".join(train))
    corpus = make_corpus_dir(tmp_path / "c", train, val)
    manifest = tokenize_corpus(TokenizerConfig.from_dict({"kind": "char", "batch_docs": 3}), corpus, tmp_path / "t")
    vocab = json.loads((tmp_path / "t" / "tokenizer.json").read_text())["model"]["vocab"]
    assert vocab[EOT] == manifest["eot_id"] == 0 and vocab[UNK] == 1
    assert set(vocab) - {EOT, UNK} == set("".join(train))
    unk = vocab[UNK]
    expected_train = [i for d in train for i in [vocab[c] for c in d] + [0]]  # a plain dict lookup
    expected_val = [i for d in val for i in [vocab.get(c, unk) for c in d] + [0]]
    assert shard_stream(tmp_path / "t", "train").tolist() == expected_train
    assert shard_stream(tmp_path / "t", "val").tolist() == expected_val
    tokenizer = load_tokenizer(tmp_path / "t")
    assert all(tokenizer.decode(tokenizer.encode(d).ids) == d for d in train)
    assert tokenizer.encode(EOT).ids == [vocab[c] for c in EOT]  # a separator string in text is text


TRICKY_TEXTS = ["", "caf\u00e9 vs cafe\u0301", "emoji \U0001F600 and \U0010FFFF", "<|endoftext|>[UNK] as text",
                "line\r\nbreaks\ttabs\x00nul", "\u4e2d\u6587", "", "end"]


def test_char_table_equals_encode_batch_fast_on_unseen_and_astral_characters(tmp_path):
    corpus = make_corpus_dir(tmp_path / "c", TOPICS[:5] + ["caf\u00e9 \U0001F600"], TOPICS[5:6])
    tokenize_corpus(TokenizerConfig.from_dict({"kind": "char"}), corpus, tmp_path / "t")
    tokenizer = load_tokenizer(tmp_path / "t")
    tokenizer.encode_special_tokens = True
    table = CharTable.of(tokenizer)
    assert table is not None
    for dtype in (np.dtype(np.uint8), np.dtype(np.uint16)):
        reference = flat_ids(tokenizer.encode_batch_fast(TRICKY_TEXTS, add_special_tokens=False), 0, dtype)
        assert table.encode(TRICKY_TEXTS, 0, dtype).tolist() == reference.tolist()
    assert (reference == 1).sum() > 5  # unseen characters (CJK, U+10FFFF, NUL) really hit [UNK]


def test_char_table_is_only_used_for_pure_character_tokenizers(tmp_path):
    corpus = make_corpus_dir(tmp_path / "c", TOPICS[:10], TOPICS[10:12])
    tokenize_corpus(TokenizerConfig.from_dict({"kind": "bpe", "vocab_size": 300}), corpus, tmp_path / "bpe")
    tokenize_corpus(TokenizerConfig.from_dict({"kind": "char"}), corpus, tmp_path / "char")
    assert CharTable.of(load_tokenizer(tmp_path / "bpe")) is None  # merges
    spec = json.loads((tmp_path / "char" / "tokenizer.json").read_text())
    for key, value in (("normalizer", {"type": "Lowercase"}), ("fuse_unk", True)):
        changed = json.loads(json.dumps(spec))
        (changed if key == "normalizer" else changed["model"])[key] = value
        tokenizer = Tokenizer.from_str(json.dumps(changed))
        assert CharTable.of(tokenizer) is None, key
    # such a tokenizer.json still tokenizes exactly (through encode_batch_fast)
    lower = json.loads(json.dumps(spec))
    lower["normalizer"] = {"type": "Lowercase"}
    (tmp_path / "lower.json").write_text(json.dumps(lower))
    cfg = TokenizerConfig.from_dict({"kind": "file", "path": str(tmp_path / "lower.json")})
    manifest = tokenize_corpus(cfg, corpus, tmp_path / "t")
    reference = Tokenizer.from_str(json.dumps(lower))
    assert shard_stream(tmp_path / "t", "val").tolist() == direct_stream(reference, TOPICS[10:12], manifest["eot_id"])


def test_a_single_character_special_token_keeps_its_model_id_past_the_checked_sample(tmp_path):
    """A character tokenizer.json whose model vocab holds a character that is also a special token
    ('|' here): with special tokens encoded as text the model gives it its vocab id, and so must the
    character table, also where it first appears after the sample encode_stream checks (64k chars)."""
    vocab = {EOT: 0, UNK: 1, "a": 2, "b": 3, "|": 4}
    user = Tokenizer(models.BPE(vocab, [], unk_token=UNK))
    user.add_special_tokens([EOT, UNK, "|"])
    user.save(str(tmp_path / "user.json"))
    docs = ["ab" * 40_000, "a|b", "a|b"]
    corpus = make_corpus_dir(tmp_path / "c", docs, docs)
    cfg = TokenizerConfig.from_dict({"kind": "file", "path": str(tmp_path / "user.json")})
    manifest = tokenize_corpus(cfg, corpus, tmp_path / "t")
    encoder = load_tokenizer(tmp_path / "t")
    assert shard_stream(tmp_path / "t", "train").tolist() == direct_stream(encoder, docs, manifest["eot_id"])
    assert shard_stream(tmp_path / "t", "train")[-4:].tolist() == [2, 4, 3, 0]

def test_bpe_is_trained_on_the_train_split_only(tmp_path):
    train = TOPICS[:25]
    marker = " zqxzqxv"
    val = [marker * 200 + " " + TOPICS[40]]
    assert "zq" not in "".join(train)
    def vocab_after(training_docs: list[str], name: str) -> dict[str, int]:
        corpus = make_corpus_dir(tmp_path / f"c{name}", training_docs, val)
        tokenize_corpus(TokenizerConfig.from_dict({"kind": "bpe", "vocab_size": 400}), corpus, tmp_path / f"t{name}")
        return json.loads((tmp_path / f"t{name}" / "tokenizer.json").read_text())["model"]["vocab"]
    assert not [t for t in vocab_after(train, "train") if "zq" in t]
    assert [t for t in vocab_after(train + val, "leak") if "zq" in t]  # the check can see a leak


def test_manifest_hashes_counts_and_dtypes_match_the_files(tmp_path):
    corpus = make_corpus_dir(tmp_path / "c", TOPICS[:30], TOPICS[30:36])
    for kind, dtype in (("char", "uint8"), ("bpe", "uint16")):
        out = tmp_path / kind
        cfg = TokenizerConfig.from_dict({"kind": kind, "vocab_size": 512, "shard_tokens": 20_000})
        manifest = tokenize_corpus(cfg, corpus, out)
        assert manifest["dtype"] == dtype
        assert manifest["tokenizer"]["sha256"] == hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest()
        for split, docs in (("train", TOPICS[:30]), ("val", TOPICS[30:36])):
            entry = manifest["splits"][split]
            assert entry["num_docs"] == len(docs)
            assert entry["num_tokens"] == sum(s["num_tokens"] for s in entry["shards"]) == len(shard_stream(out, split))
            for shard in entry["shards"]:
                assert hashlib.sha256((out / shard["file"]).read_bytes()).hexdigest() == shard["sha256"]
                column_type = ipc.open_file(str(out / shard["file"])).schema.field("tokens").type
                assert column_type == pa.from_numpy_dtype(np.dtype(dtype))
        assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["vocab_size"] == 512


@pytest.mark.parametrize(("vocab", "dtype"), [(65, np.uint8), (256, np.uint8), (257, np.uint16), (512, np.uint16),
                                              (65536, np.uint16), (65537, np.uint32)])
def test_dtype_is_the_smallest_unsigned_type_that_fits(vocab, dtype):
    assert token_dtype(vocab) == np.dtype(dtype)


def test_tiny_shards_concatenate_to_the_direct_encoding(tmp_path):
    train, val = TOPICS[:12], TOPICS[12:15]
    corpus = make_corpus_dir(tmp_path / "c", train, val)
    # shards of 197 tokens, below the schema's minimum: the full field set, bypassing from_dict
    cfg = TokenizerConfig(kind="bpe", vocab_size=300, path=None, shard_tokens=197, batch_docs=2)
    manifest = tokenize_corpus(cfg, corpus, tmp_path / "t")
    tokenizer = Tokenizer.from_file(str(tmp_path / "t" / "tokenizer.json"))
    for split, docs in (("train", train), ("val", val)):
        shards = manifest["splits"][split]["shards"]
        assert len(shards) > 1 and all(s["num_tokens"] == 197 for s in shards[:-1])
        assert 0 < shards[-1]["num_tokens"] <= 197
        assert shard_stream(tmp_path / "t", split).tolist() == direct_stream(tokenizer, docs, manifest["eot_id"])


def test_encode_batches_close_at_max_docs_or_max_chars():
    """At most ``max_docs`` documents per batch, closed as soon as the characters reach ``max_chars``;
    every document once, in order."""
    docs = [f"d{i}" for i in range(7)]
    assert list(batched(iter(docs), 3)) == [docs[0:3], docs[3:6], docs[6:7]]
    assert list(batched(iter(["abc", "de", "f", "ghij", "k"]), 10, max_chars=5)) == [["abc", "de"], ["f", "ghij"], ["k"]]
    assert list(batched(iter([]), 3)) == []


def test_the_separator_is_the_tokenizers_own_end_of_text_token_when_it_has_one():
    """A tokenizer with ``</s>`` (an EOT_CANDIDATES entry) among its special tokens keeps it as the separator,
    with its id and no token added; one with none gets <|endoftext|> added at the next id."""
    from tokenizers import models

    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "</s>": 2}, unk_token="[UNK]"))
    tokenizer.add_special_tokens(["</s>"])
    assert end_of_text(tokenizer) == ("</s>", 2) and tokenizer.get_vocab_size() == 3
    plain = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    assert end_of_text(plain) == (EOT, 2) and plain.get_vocab_size() == 3


def test_an_added_separator_never_takes_the_id_of_a_token(tmp_path):
    """tokenizers numbers an added token after the vocabulary's count: in a vocabulary with a gap in its ids
    that id is a token's ('b' here), whose every occurrence would have read as a separator; so is a
    tokenizer.json's own </s> (its added_tokens id 4 is renumbered to 3 when loaded)."""
    from tokenizers import models

    gap = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 3}, unk_token="[UNK]"))
    gap.save(str(tmp_path / "gap.json"))
    with pytest.raises(DataError, match=r"^user\.json: its end-of-text token '<\|endoftext\|>' gets id 3, which "
                                        r"is also its token 'b' .*its ids have gaps"):
        end_of_text(gap, "user.json")
    spec = json.loads((tmp_path / "gap.json").read_text())
    spec["added_tokens"] = [{"id": 4, "content": "</s>", "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": True}]
    with pytest.raises(DataError, match=r"end-of-text token '</s>' gets id 3, which is also its token 'b'"):
        end_of_text(Tokenizer.from_str(json.dumps(spec)))
    named = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 3, EOT: 7}, unk_token="[UNK]"))
    assert end_of_text(named) == (EOT, 7)  # its own <|endoftext|> (made special): no new id


def test_user_tokenizer_file_gets_a_separator_and_no_truncation(tmp_path):
    corpus = make_corpus_dir(tmp_path / "c", TOPICS[:10], TOPICS[10:12])
    tokenize_corpus(TokenizerConfig.from_dict({"kind": "bpe", "vocab_size": 300}), corpus, tmp_path / "bpe")
    spec = json.loads((tmp_path / "bpe" / "tokenizer.json").read_text())
    spec["added_tokens"] = []  # drop <|endoftext|> from the special tokens and the vocab, renumbered without a gap
    del spec["model"]["vocab"][EOT]
    spec["model"]["vocab"] = {token: i for i, token in enumerate(sorted(spec["model"]["vocab"],
                                                                       key=spec["model"]["vocab"].get))}
    spec["truncation"] = {"direction": "Right", "max_length": 8, "strategy": "LongestFirst", "stride": 0}
    (tmp_path / "user.json").write_text(json.dumps(spec))
    user = Tokenizer.from_file(str(tmp_path / "user.json"))
    assert len(user.encode(TOPICS[10]).ids) == 8  # the stage must not truncate documents
    user.no_truncation()
    cfg = TokenizerConfig.from_dict({"kind": "file", "path": str(tmp_path / "user.json")})
    manifest = tokenize_corpus(cfg, corpus, tmp_path / "t")
    assert manifest["eot_token"] == EOT and manifest["eot_id"] == user.get_vocab_size()  # appended after the vocab
    assert shard_stream(tmp_path / "t", "val").tolist() == direct_stream(user, TOPICS[10:12], manifest["eot_id"])


def test_a_model_that_spells_a_documents_text_as_the_separator_is_refused(tmp_path):
    """A Unigram model holds its special tokens among its pieces (</s> at the top score, as UnigramTrainer and
    SentencePiece conversions write it): with special tokens encoded as text, a document holding "</s>" still
    came out as the separator's id, so the shards had one more document boundary than documents."""
    from tokenizers import models

    vocab = [("<unk>", 0.0), ("</s>", 0.0), *((c, -2.0) for c in "</s> abc")]
    user = Tokenizer(models.Unigram(vocab, unk_id=0))
    user.add_special_tokens(["<unk>", "</s>"])
    user.save(str(tmp_path / "user.json"))
    corpus = make_corpus_dir(tmp_path / "c", ["abc", "a b", "c </s> a", "b"], ["a", "c"])
    cfg = TokenizerConfig.from_dict({"kind": "file", "path": str(tmp_path / "user.json")})
    with pytest.raises(DataError, match=r"encodes text of .*train\.jsonl:3 as its end-of-text token '</s>' \(id 1\)"):
        tokenize_corpus(cfg, corpus, tmp_path / "t")
    assert not (tmp_path / "t").exists()
    user.add_special_tokens([EOT])  # a separator of its own, outside the model's vocabulary
    user.save(str(tmp_path / "own.json"))
    manifest = tokenize_corpus(TokenizerConfig.from_dict({"kind": "file", "path": str(tmp_path / "own.json")}),
                               corpus, tmp_path / "own")
    stream = shard_stream(tmp_path / "own", "train")
    assert manifest["eot_token"] == EOT and np.count_nonzero(stream == manifest["eot_id"]) == 4


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_corpus_file_cut_short_at_a_line_end_is_refused(tmp_path, split):
    """A JSONL file that lost its last lines (a copy cut short, a hand edit) is still valid JSONL: its
    documents were tokenized as if they were the corpus, beside a manifest taking corpus.json's counts."""
    corpus = make_corpus_dir(tmp_path / "c", TOPICS[:4], TOPICS[4:6])
    lines = (corpus / f"{split}.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (corpus / f"{split}.jsonl").write_text("".join(lines[:-1]), encoding="utf-8")
    with pytest.raises(DataError, match=rf"{split}\.jsonl holds {len(lines) - 1} documents, but .*corpus\.json "
                                        rf"counts {len(lines)} \(truncated or edited\? rerun the corpus stage\)"):
        tokenize_corpus(TokenizerConfig.from_dict({"kind": "char"}), corpus, tmp_path / "t")
    assert not (tmp_path / "t").exists()


def test_user_bpe_dropout_is_dropped_so_the_shards_are_deterministic(tmp_path):
    """BPE-dropout (a training-time regularizer some tokenizer.json files carry) skips merges at random:
    each build's shards differed, and so did every later encoding with the saved tokenizer.json."""
    corpus = make_corpus_dir(tmp_path / "c", TOPICS[:10], TOPICS[10:12])
    tokenize_corpus(TokenizerConfig.from_dict({"kind": "bpe", "vocab_size": 300}), corpus, tmp_path / "bpe")
    spec = json.loads((tmp_path / "bpe" / "tokenizer.json").read_text())
    spec["model"]["dropout"] = 0.5
    (tmp_path / "user.json").write_text(json.dumps(spec))
    cfg = TokenizerConfig.from_dict({"kind": "file", "path": str(tmp_path / "user.json")})
    tokenize_corpus(cfg, corpus, tmp_path / "t")
    assert shard_stream(tmp_path / "t", "val").tolist() == shard_stream(tmp_path / "bpe", "val").tolist()
    assert json.loads((tmp_path / "t" / "tokenizer.json").read_text())["model"]["dropout"] is None


# ---------------------------------------------------------------- loader


VAL_DOCS = [TOPICS[0][:700], TOPICS[1][:500]]  # every character also occurs in train


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    corpus = make_corpus_dir(root / "c", TOPICS[:8], VAL_DOCS)
    # shards of 1,000 tokens, below the schema's minimum: the full field set, bypassing from_dict
    cfg = TokenizerConfig(kind="char", vocab_size=512, path=None, shard_tokens=1000, batch_docs=1000)
    tokenize_corpus(cfg, corpus, root / "t")
    return root / "t"


def test_windows_are_the_stream_at_the_sampled_offsets_across_shards(small_shards):
    data = TokenShards(small_shards, "train")
    stream = shard_stream(small_shards, "train")
    assert data.num_tokens == len(stream)
    assert data.vocab_size == json.loads((small_shards / "manifest.json").read_text())["vocab_size"]
    context, batch = 300, 64  # windows of 301 tokens over 1000-token shards: many cross a boundary
    starts = data.sample_starts(batch, context, torch.Generator().manual_seed(3))
    x, y = data.sample_windows(batch, context, torch.Generator().manual_seed(3))
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (batch, context)
    crossing = 0
    for i, s in enumerate(starts.tolist()):
        assert x[i].tolist() == stream[s : s + context].tolist()
        assert y[i].tolist() == stream[s + 1 : s + context + 1].tolist()
        crossing += s // 1000 != (s + context) // 1000
    assert crossing > 0
    assert int(starts.max()) <= len(stream) - context - 1


def test_same_seed_same_windows_other_seed_other_windows(small_shards):
    data = TokenShards(small_shards, "train")
    a = data.sample_windows(16, 32, torch.Generator().manual_seed(11))
    b = data.sample_windows(16, 32, torch.Generator().manual_seed(11))
    c = data.sample_windows(16, 32, torch.Generator().manual_seed(12))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])


def test_window_starts_cover_every_offset_of_a_max_tokens_prefix_and_nothing_past_it(small_shards):
    """``max_tokens`` keeps the first M tokens: starts are uniform on 0 … M − context − 1 (every window of
    context + 1 tokens that fits, the last one included) and every window lies inside the prefix."""
    stream = shard_stream(small_shards, "train")
    context, prefix = 5, 9  # 9 tokens hold windows of 6 at starts 0, 1, 2, 3
    data = TokenShards(small_shards, "train", max_tokens=prefix)
    assert data.num_tokens == prefix and TokenShards(small_shards, "train", max_tokens=10**9).num_tokens == len(stream)
    starts = data.sample_starts(400, context, torch.Generator().manual_seed(0))
    assert set(starts.tolist()) == {0, 1, 2, 3}
    x, y = data.sample_windows(400, context, torch.Generator().manual_seed(0))
    for s, xs, ys in zip(starts.tolist(), x.tolist(), y.tolist()):
        assert xs == stream[s:s + context].tolist() and ys == stream[s + 1:s + context + 1].tolist()
    with pytest.raises(IndexError):
        data.tokens(0, prefix + 1)
    # 9 tokens = 3 windows of 3 targets would need a 10th token: whole-split eval takes 2 windows (1 … 6)
    assert data.sequential_windows(3).tolist() == [stream[0:4].tolist(), stream[3:7].tolist()]
    with pytest.raises(DataError, match="longer than the train split"):
        data.check_context(prefix)


def test_resident_windows_are_the_shard_windows_and_resume_from_the_generator_state(small_shards):
    """ResidentTokens draws the same starts from the same generator as TokenShards (so the data order
    does not depend on where the tokens live), and a generator restored from a saved state continues
    with the windows the uninterrupted generator would have drawn (resume)."""
    data = TokenShards(small_shards, "train")
    resident = data.resident(torch.device("cpu"))
    gen_a, gen_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for _ in range(3):
        (xa, ya), (xb, yb) = data.sample_windows(8, 40, gen_a), resident.sample_windows(8, 40, gen_b)
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and xb.dtype == torch.int64
    saved = gen_b.get_state()
    expected = resident.sample_windows(8, 40, gen_b)
    restored = torch.Generator()
    restored.set_state(saved)
    got = resident.sample_windows(8, 40, restored)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert torch.equal(got[0][:, 1:], got[1][:, :-1])  # y is x shifted by one token


def test_an_empty_token_range_is_an_empty_array_anywhere_in_the_stream(small_shards):
    """tokens(start, stop) takes 0 <= start <= stop <= num_tokens: start == stop is the empty range
    (at the stream's start, at a shard boundary and at its end), not a ValueError from np.concatenate."""
    data = TokenShards(small_shards, "train")
    boundary = int(data._starts[1])
    for start in (0, 5, boundary, data.num_tokens):
        got = data.tokens(start, start)
        assert got.shape == (0,) and got.dtype == np.dtype(data.manifest["dtype"])
    assert data.tokens(boundary - 1, boundary).tolist() == shard_stream(small_shards, "train")[boundary - 1 : boundary].tolist()

def test_sequential_windows_cover_each_target_once(small_shards):
    data = TokenShards(small_shards, "val")
    stream = shard_stream(small_shards, "val")
    context = 100
    windows = data.sequential_windows(context)
    n = (len(stream) - 1) // context
    assert windows.shape == (n, context + 1) and windows.dtype == torch.int64
    assert windows[:, 1:].reshape(-1).tolist() == stream[1 : n * context + 1].tolist()
    assert windows[:, 0].tolist() == stream[0 : n * context : context].tolist()
    assert data.sequential_windows(context, max_windows=3).tolist() == windows[:3].tolist()


def test_sequential_windows_at_zero_and_one_window(small_shards):
    """max_windows=0 is no window (shape (0, context + 1)), not a sliding_window_view ValueError; a split
    holding one window gives it as an ordinary writable tensor, with no 'non-writable NumPy array' warning."""
    import warnings

    data = TokenShards(small_shards, "val")
    stream = shard_stream(small_shards, "val")
    none = data.sequential_windows(10, max_windows=0)
    assert none.shape == (0, 11) and none.dtype == torch.int64
    context = (len(stream) - 1) // 2 + 1  # (num_tokens - 1) // context == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        one = data.sequential_windows(context)
        capped = data.sequential_windows(10, max_windows=1)
    assert one.shape == (1, context + 1) and one[0].tolist() == stream[: context + 1].tolist()
    assert capped.tolist() == [stream[:11].tolist()]
    one[0, 0] = -1  # the caller's own memory
    assert data.sequential_windows(context)[0, 0] == stream[0]

def test_decode_returns_the_text_with_separators(small_shards):
    data = TokenShards(small_shards, "val")
    ids = torch.from_numpy(shard_stream(small_shards, "val").astype(np.int64))
    assert data.decode(ids) == VAL_DOCS[0] + EOT + VAL_DOCS[1] + EOT


def test_context_longer_than_the_split_is_a_clear_error(small_shards):
    data = TokenShards(small_shards, "val")
    with pytest.raises(DataError, match=rf"^context 100000 is longer than the val split \({data.num_tokens} tokens\)$"):
        data.sample_windows(1, 100_000, torch.Generator())


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_shard_is_named(tmp_path, damage):
    corpus = make_corpus_dir(tmp_path / "c", TOPICS[:4], TOPICS[4:6])
    tokenize_corpus(TokenizerConfig.from_dict({"kind": "char", "shard_tokens": 5000}), corpus, tmp_path / "t")
    shard = tmp_path / "t" / "train" / "shard-00001.arrow"
    blob = bytearray(shard.read_bytes())
    if damage == "flip":
        blob[len(blob) // 2] ^= 0x01
    else:
        del blob[len(blob) // 2 :]
    shard.write_bytes(bytes(blob))
    TokenShards(tmp_path / "t", "val")  # the other split is still readable
    with pytest.raises(DataError, match=r"^corrupt shard .*train/shard-00001\.arrow: sha256 mismatch"):
        TokenShards(tmp_path / "t", "train")


def test_tokenize_progress_lines_count_what_the_manifest_records(tmp_path, monkeypatch, capsys):
    """The stage's log: a line as the tokenizer is fitted, then as the fit reads documents (PROGRESS_SECONDS
    = 0 here: one per document; a BPE fit of a large corpus took minutes without a line, as ``tokenizers``
    draws its bar only on a terminal), one when it is ready, then per split one line per new shard whose
    shard, token and document counts grow to what manifest.json records, and a closing line with the
    split's exact totals. ``report`` defaults to silence."""
    import lipflow.errors
    from lipflow.data import tokenize

    corpus = make_corpus_dir(tmp_path / "c", TOPICS[:12], [TOPICS[5], TOPICS[9]])
    cfg = {"kind": "char", "shard_tokens": 2048, "batch_docs": 1}
    silent_manifest = tokenize_corpus(TokenizerConfig.from_dict(cfg), corpus, tmp_path / "quiet")
    assert capsys.readouterr().out == ""
    monkeypatch.setattr(lipflow.errors, "PROGRESS_SECONDS", 0.0)
    tokenize.main(["--corpus-dir", str(corpus), "--config-json", json.dumps(cfg), "--out-dir", str(tmp_path / "t")])
    manifest = json.loads((tmp_path / "t" / "manifest.json").read_text())
    assert manifest["splits"] == silent_manifest["splits"]
    lines = [re.sub(r" \(\d+\.\d s\)$", "", line) for line in capsys.readouterr().out.splitlines()[:-1]]
    # the fit reads the train split once, a line per document read here
    assert lines[:14] == (["tokenize: fitting the char tokenizer on train.jsonl"]
                          + [f"tokenize: fitting: {n} of 12 documents read" for n in range(1, 13)]
                          + [f"tokenize: tokenizer ready: vocab {manifest['vocab_size']:,}, {manifest['dtype']} tokens"])
    for split, count in (("train", 12), ("val", 2)):
        info = manifest["splits"][split]
        progress = [re.fullmatch(rf"tokenize: {split}: (\d+) shards?, ([\d,]+) tokens, ([\d,]+) of {count} documents",
                                 line) for line in lines if line.startswith(f"tokenize: {split}: ")]
        shards = [int(m[1]) for m in progress]
        documents = [int(m[3].replace(",", "")) for m in progress]
        # a line at every batch that completed a shard: counts only grow, up to the last whole shard
        assert shards == sorted(set(shards)) and shards[-1] == info["num_tokens"] // 2048
        assert documents == sorted(set(documents)) and 0 < documents[0] and documents[-1] <= count
        assert [int(m[2].replace(",", "")) for m in progress] == [n * 2048 for n in shards]
        assert (f"tokenize: {split} done: {len(info['shards'])} shards, {count} documents, {info['num_tokens']:,} tokens"
                in lines)
    # a file tokenizer is loaded from its path, not fitted on (or loaded "on") train.jsonl
    file_cfg = {"kind": "file", "path": str(tmp_path / "t" / "tokenizer.json")}
    tokenize.main(["--corpus-dir", str(corpus), "--config-json", json.dumps(file_cfg), "--out-dir", str(tmp_path / "f")])
    loaded = capsys.readouterr().out.splitlines()
    assert loaded[0].startswith(f"tokenize: loading the tokenizer {file_cfg['path']} (")
    assert loaded[1].startswith("tokenize: tokenizer ready: ")  # reads no train document
    bpe_cfg = {"kind": "bpe", "vocab_size": 300}
    tokenize.main(["--corpus-dir", str(corpus), "--config-json", json.dumps(bpe_cfg), "--out-dir", str(tmp_path / "b")])
    fitted = [re.sub(r" \(\d+\.\d s\)$", "", line) for line in capsys.readouterr().out.splitlines()]
    assert fitted[1:13] == [f"tokenize: fitting: {n} of 12 documents read" for n in range(1, 13)]


def rewritten_train_shard(tmp_path, batches_of) -> tuple[dict, dict]:
    """(manifest, its first train shard's entry) of char shards in tmp_path/t whose first train shard is
    rewritten as the record batches ``batches_of(tokens, manifest)``, its sha256 updated in manifest.json
    so that the checksum passes."""
    import pyarrow.ipc as ipc

    from lipflow.atomic import sha256_file

    corpus = make_corpus_dir(tmp_path / "c", TOPICS[:4], TOPICS[4:6])
    tokenize_corpus(TokenizerConfig.from_dict({"kind": "char"}), corpus, tmp_path / "t")
    manifest = json.loads((tmp_path / "t" / "manifest.json").read_text())
    entry = manifest["splits"]["train"]["shards"][0]
    shard = tmp_path / "t" / entry["file"]
    tokens = ipc.open_file(pa.memory_map(str(shard))).get_batch(0).column("tokens").to_numpy().copy()
    with ipc.new_file(str(shard), pa.schema([("tokens", pa.from_numpy_dtype(tokens.dtype))])) as writer:
        for batch in batches_of(tokens, manifest):
            writer.write_batch(pa.record_batch([pa.array(batch)], names=["tokens"]))
    entry["sha256"] = sha256_file(shard)
    (tmp_path / "t" / "manifest.json").write_text(json.dumps(manifest))
    return manifest, entry


def test_a_shard_with_a_token_outside_the_vocabulary_is_named(tmp_path):
    """A shard rewritten with an id ≥ vocab_size is refused when opened, not an IndexError in the
    embedding mid-run."""
    def one_id_past_the_vocabulary(tokens, manifest):
        tokens[7] = manifest["vocab_size"]
        return [tokens]

    manifest, _ = rewritten_train_shard(tmp_path, one_id_past_the_vocabulary)
    with pytest.raises(DataError, match=rf"^corrupt shard .*: token id {manifest['vocab_size']} is outside the "
                                        rf"vocabulary of {manifest['vocab_size']}"):
        TokenShards(tmp_path / "t", "train")


@pytest.mark.parametrize("batches", [0, 2])
def test_a_shard_of_other_than_one_record_batch_is_named(tmp_path, batches):
    """A shard rewritten as no record batch or two: one error naming it (none was a bare 'Batch number 0
    out of range')."""
    _, entry = rewritten_train_shard(tmp_path, lambda tokens, _: np.array_split(tokens, batches) if batches else [])
    with pytest.raises(DataError, match=rf"^corrupt shard .*{entry['file']}: {batches} record batches, manifest.json "
                                        rf"says 1 of {entry['num_tokens']} "):
        TokenShards(tmp_path / "t", "train")


@pytest.mark.parametrize("edit, pattern", [
    ({"dtype": "uint17"}, r"dtype 'uint17' is not one of uint8, uint16, uint32"),
    ({"file": 5}, r"shard 0 of split 'train' has a file name that is not a string"),
])
def test_a_manifest_value_of_the_wrong_type_is_named(small_shards, tmp_path, edit, pattern):
    """A hand-edited manifest.json value (no checksum guards it) is one error naming the file, not a
    TypeError from numpy ('data type 'uint17' not understood') or pathlib."""
    import shutil

    shutil.copytree(small_shards, tmp_path / "t")
    manifest = json.loads((tmp_path / "t" / "manifest.json").read_text())
    if "file" in edit:
        manifest["splits"]["train"]["shards"][0].update(edit)
    else:
        manifest.update(edit)
    (tmp_path / "t" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=rf"^{re.escape(str(tmp_path / 't' / 'manifest.json'))}: {pattern}"):
        TokenShards(tmp_path / "t", "train", verify=False)


# ---------------------------------------------------------------- bad input through the CLIs


def run_cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=120)


def corpus_cli(cfg: dict, out: Path) -> subprocess.CompletedProcess:
    return run_cli("lipflow.data.corpus", "--config-json", json.dumps(cfg), "--out-dir", str(out))


def write(path: Path, data: bytes | str) -> str:
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(path)


def lonely_text(split: str) -> str:
    """A one-document corpus whose only document hashes into ``split`` at val_fraction 0.5."""
    return next(f"lonely {i}" for i in range(1000) if split_of(f"lonely {i}", 0.5, 0) == split)


# case: (source, files to create {name: text | bytes | pa.Table → Parquet}, paths, more config, error pattern)
CORPUS_CASES = {
    "missing file": ("files", {}, ["nope.txt"], {}, r"file not found: .*nope\.txt"),
    "glob matches nothing": ("files", {}, ["*.none"], {}, r"glob '.*\*\.none' matched no files"),
    "empty corpus": ("files", {"blank.txt": " \n\n\t\n"}, ["blank.txt"], {}, r"empty corpus: .*blank\.txt"),
    "binary file": ("files", {"a.txt": "fine", "b.bin": b"ab\x00cd"}, ["a.txt", "b.bin"], {},
                    r"b\.bin: binary file \(NUL byte at byte offset 2\)"),
    "non-UTF-8 file": ("files", {"latin1.txt": "ok line\nna\u00efve\n".encode("latin-1")}, ["latin1.txt"], {},
                       r"latin1\.txt: not UTF-8 \(invalid byte 0xef at byte offset 10\)"),
    "malformed JSONL": ("jsonl", {"a.jsonl": '{"text": "fine"}\n{"text": oops}\n'}, ["a.jsonl"], {},
                        r"a\.jsonl:2: malformed JSON line"),
    "missing JSONL column": ("jsonl", {"a.jsonl": '{"body": "x"}\n'}, ["a.jsonl"], {},
                             r"a\.jsonl:1: missing text column 'text' \(keys: body\)"),
    # json.loads keeps the last of a repeated key: "first" vanished from the corpus without a word
    "repeated JSONL column": ("jsonl", {"a.jsonl": '{"text": "kept"}\n{"text": "first", "id": 2, "text": "second"}\n'},
                              ["a.jsonl"], {}, r"a\.jsonl:2: text column 'text' appears 2 times in the record "
                                               r"\(keep one\)$"),
    "missing Parquet column": ("parquet", {"a.parquet": pa.table({"body": ["text"]})}, ["a.parquet"], {},
                               r"a\.parquet: missing text column 'text' \(columns: body\)"),
    "val split empty": ("files", {"one.txt": lonely_text("train")}, ["one.txt"], {"val_fraction": 0.5},
                        r"val split is empty \(0 of 1 documents\): raise corpus\.val_fraction .*a single file is cut "
                        r"into documents at the first blank line after 2,000 characters, or at the first line end "
                        r"after 20,000: this one gives one document\)$"),
    # 100 line ends, one document (under 2,000 characters): the hint names the size rule, not too few line ends
    "val split empty, a short file": ("files", {"short.txt": next(t for t in (f"short {i}\n" * 100 for i in range(1000))
                                                                    if split_of(t, 0.5, 0) == "train")},
                                      ["short.txt"], {"val_fraction": 0.5},
                                      r"\(0 of 1 documents\).*at the first blank line after 2,000 characters"),
    # a JSONL record is a document whatever its line ends: no single-file hint
    "val split empty, one JSONL record": ("jsonl", {"one.jsonl": json.dumps({"text": lonely_text("train")}) + "\n"},
                                          ["one.jsonl"], {"val_fraction": 0.5},
                                          r"val split is empty \(0 of 1 documents\): .*or add documents$"),
    # one document fills one split whatever the fraction or seed: the hint says why there is one, as for val
    "train split empty": ("files", {"one.txt": lonely_text("val")}, ["one.txt"], {"val_fraction": 0.5},
                          r"train split is empty \(all 1 documents went to val\): lower corpus\.val_fraction .*a "
                          r"single file is cut into documents .*: this one gives one document\)$"),
    "unknown source": ("parquett", {}, [], {},
                       r"corpus\.source: 'parquett' is not one of embedded, files, jsonl, parquet"),
    "unknown key": ("files", {}, [], {"sourc": "files"}, r"unknown key 'corpus\.sourc' \(did you mean 'source'\?\)"),
    "val_fraction out of range": ("files", {"a.txt": "fine"}, ["a.txt"], {"val_fraction": 1.5},
                                  r"corpus\.val_fraction: 1\.5 is greater than or equal to the maximum of 1"),
    "split_seed not an integer": ("embedded", {}, [], {"split_seed": "0"},
                                  r"corpus\.split_seed: '0' is not of type 'integer'"),
    "paths for the embedded source": ("embedded", {"a.txt": "fine"}, ["a.txt"], {},
                                      r"corpus\.paths must be empty for corpus\.source 'embedded'"),
    "no paths for a file source": ("jsonl", {}, [], {}, r"corpus\.paths is empty; corpus\.source 'jsonl' needs a path"),
}


def assert_one_line_error(result: subprocess.CompletedProcess, pattern: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lipflow: error: "), result.stderr
    assert re.search(pattern, lines[0]), lines[0]


@pytest.mark.parametrize("case", list(CORPUS_CASES))
def test_bad_corpus_input_fails_cleanly(tmp_path, case):
    source, files, paths, extra, pattern = CORPUS_CASES[case]
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name, content in files.items():
        if isinstance(content, pa.Table):
            pq.write_table(content, inputs / name)
        else:
            write(inputs / name, content)
    cfg = {"source": source, "paths": [str(inputs / p) for p in paths], **extra}
    result = corpus_cli(cfg, tmp_path / "out" / "corpus")
    assert_one_line_error(result, pattern)
    assert not (tmp_path / "out" / "corpus").exists()
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []  # no temp dir left over


def test_unwritable_output_directory_is_named(tmp_path):
    blocker = write(tmp_path / "a-file", "not a directory")
    assert_one_line_error(corpus_cli({"name": "x"}, Path(blocker) / "corpus"),
                          r"^lipflow: error: cannot create .*a-file/corpus: a file is in the way$")
    assert_one_line_error(corpus_cli({"name": "x"}, Path(blocker) / "sub" / "corpus"),
                          r"^lipflow: error: cannot create .*a-file/sub/corpus: Not a directory$")


def test_failed_rerun_leaves_the_previous_output_untouched(tmp_path):
    good = write(tmp_path / "good.txt", "\n\n".join(TOPICS[:20]))
    assert corpus_cli({"source": "files", "paths": [good]}, tmp_path / "out").returncode == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    bad = write(tmp_path / "bad.txt", b"ok \xff")
    assert_one_line_error(corpus_cli({"source": "files", "paths": [bad]}, tmp_path / "out"), r"bad\.txt: not UTF-8")
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["bad.txt", "good.txt", "out"]


TOKENIZE_CASES = {
    "missing tokenizer file": ({"kind": "file", "path": "/nonexistent/tokenizer.json"},
                               r"tokenizer\.path: /nonexistent/tokenizer\.json not found"),
    "invalid tokenizer file": ({"kind": "file", "path": "{corpus}/corpus.json"},
                               r"tokenizer\.path: .*corpus\.json is not a valid tokenizer\.json"),
    "file kind without path": ({"kind": "file"}, r"tokenizer\.path is required when tokenizer\.kind is 'file'"),
    "bpe vocab too small": ({"kind": "bpe", "vocab_size": 100},
                            r"tokenizer\.vocab_size: 100 is less than the minimum of 257"),
    "unknown kind": ({"kind": "bpee"}, r"tokenizer\.kind: 'bpee' is not one of char, bpe, file"),
    "bad shard size": ({"kind": "char", "shard_tokens": 0},
                       r"tokenizer\.shard_tokens: 0 is less than the minimum of 1024"),
    "path not a string": ({"kind": "file", "path": 7}, r"tokenizer\.path: 7 is not of type 'string', 'null'"),
    "missing corpus": ({"kind": "char", "corpus_dir": "missing"}, r"corpus dir .*missing has no corpus\.json"),
}


@pytest.mark.parametrize("case", list(TOKENIZE_CASES))
def test_bad_tokenize_input_fails_cleanly(tmp_path, case):
    cfg, pattern = TOKENIZE_CASES[case]
    corpus = make_corpus_dir(tmp_path / "corpus", TOPICS[:3], TOPICS[3:4])
    corpus_dir = tmp_path / cfg.pop("corpus_dir", "corpus")
    cfg = {k: v.format(corpus=corpus) if isinstance(v, str) else v for k, v in cfg.items()}
    result = run_cli("lipflow.data.tokenize", "--corpus-dir", str(corpus_dir), "--config-json", json.dumps(cfg),
                     "--out-dir", str(tmp_path / "out" / "tok"))
    assert_one_line_error(result, pattern)
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


def test_cli_happy_path_prints_a_summary_and_writes_a_readable_split(tmp_path):
    path = write(tmp_path / "book.txt", "\n\n".join(TOPICS[:30]))
    corpus = corpus_cli({"name": "book", "source": "files", "paths": [path]}, tmp_path / "corpus")
    assert corpus.returncode == 0 and "corpus 'book'" in corpus.stdout, corpus.stderr
    tok = run_cli("lipflow.data.tokenize", "--corpus-dir", str(tmp_path / "corpus"),
                  "--config-json", json.dumps({"kind": "bpe", "vocab_size": 300}), "--out-dir", str(tmp_path / "tok"))
    assert tok.returncode == 0, tok.stderr
    data = TokenShards(tmp_path / "tok", "val")
    assert data.vocab_size == 300 and data.num_tokens > 0
    assert sorted(os.listdir(tmp_path)) == ["book.txt", "corpus", "tok"]


@pytest.mark.parametrize("kind", ["loop", "dangling"])
def test_a_corpus_path_that_is_a_broken_link_says_so_not_file_not_found(tmp_path, kind):
    """A link to a missing file, or a loop of links (a → b → a), was reported as 'file not found', though the
    path is there: the message names the link and where it points."""
    from lipflow.data import DataError
    from lipflow.data.corpus import expand_paths

    link = tmp_path / "a.txt"
    if kind == "loop":
        (tmp_path / "b.txt").symlink_to(link)
        link.symlink_to(tmp_path / "b.txt")
    else:
        link.symlink_to(tmp_path / "moved.txt")
    target = "b.txt" if kind == "loop" else "moved.txt"
    with pytest.raises(DataError, match=rf"^corpus\.paths: .*a\.txt is a link to .*{target}, which does not resolve "
                                        r"to a file \(a missing target or a loop of links\)$"):
        expand_paths([str(link)])

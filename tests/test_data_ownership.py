"""The data stages replace an --out-dir only when it is recognisably their own earlier output (names
alone prove nothing: a user's folder of train.jsonl/val.jsonl, or of train/ and val/ image folders,
is refused and left as it was), and the bad inputs that used to end in a traceback or in a line
naming no file: a huge shard_tokens, a tokenizer.json with no unknown token, a lone surrogate in a
JSONL line, a Parquet string column that is not UTF-8."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import run_stage
from lipflow.errors import DataError, run_guarded


def one_line_refusal(done, *words: str) -> str:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith("lipflow: error: ") and all(word in lines[0] for word in words), lines[0]
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every entry under ``folder`` with its bytes (None for a folder)."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def no_temporaries(parent: Path) -> None:
    assert [p.name for p in parent.iterdir() if p.name.startswith(".")] == []


def corpus_stage(cfg: dict, out: Path, cwd: Path):
    return run_stage("lipflow.data.corpus", "--config-json", json.dumps(cfg), "--out-dir", str(out), cwd=cwd)


def tokenize_stage(corpus: Path, cfg: dict, out: Path, cwd: Path | None = None):
    return run_stage("lipflow.data.tokenize", "--corpus-dir", str(corpus), "--config-json", json.dumps(cfg),
                     "--out-dir", str(out), cwd=cwd)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A small corpus-stage output (200 documents of a few words)."""
    from lipflow.data.corpus import CorpusConfig, build_corpus

    root = tmp_path_factory.mktemp("ownership")
    docs = root / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"the cat {i} sat on a mat {i % 7}"}) + "\n" for i in range(200)))
    build_corpus(CorpusConfig.from_dict({"name": "tiny", "source": "jsonl", "paths": [str(docs)]}), root / "corpus")
    return root / "corpus"


def test_corpus_refuses_a_users_folder_of_jsonl_files_and_replaces_its_own(tmp_path):
    """The red team's case: --out-dir is the user's data folder holding train.jsonl and val.jsonl (the
    input among them): refused in one line naming --out-dir and the folder, both files byte for byte
    as they were. The stage's own output, and what Snakemake leaves of it, is still replaced."""
    mydata = tmp_path / "mydata"
    mydata.mkdir()
    (mydata / "train.jsonl").write_text("".join(json.dumps({"text": f"doc {i} " * 5, "label": i}) + "\n"
                                                for i in range(200)))
    (mydata / "val.jsonl").write_text("".join(json.dumps({"text": f"held {i} " * 5}) + "\n" for i in range(50)))
    before = snapshot(mydata)
    cfg = {"name": "mine", "source": "jsonl", "paths": ["mydata/train.jsonl"]}
    one_line_refusal(corpus_stage(cfg, Path("mydata"), tmp_path), "--out-dir mydata", "refusing to replace")
    assert snapshot(mydata) == before
    no_temporaries(tmp_path)

    out = tmp_path / "corpus"
    for _ in range(2):  # the stage's own earlier output is replaced
        assert corpus_stage(cfg, out, tmp_path).returncode == 0
    for name in ("corpus.json", "train.jsonl", "val.jsonl"):  # Snakemake deletes the declared outputs
        (out / name).unlink()
    assert corpus_stage(cfg, out, tmp_path).returncode == 0 and (out / "corpus.json").is_file()
    assert snapshot(mydata) == before


def test_tokenize_refuses_a_users_folder_of_train_and_val_subfolders(corpus, tmp_path):
    """The red team's case: --out-dir holds train/cats/1.jpg and val/dogs/: refused, nothing deleted;
    so is the folder of a user's own tokenizer.json (given as the `file` tokenizer, too). The stage's
    own shards, and what Snakemake leaves of them (manifest.json and tokenizer.json deleted), are replaced."""
    imgs = tmp_path / "imgs"
    (imgs / "train" / "cats").mkdir(parents=True)
    (imgs / "val" / "dogs").mkdir(parents=True)
    (imgs / "train" / "cats" / "1.jpg").write_text("x")
    before = snapshot(imgs)
    one_line_refusal(tokenize_stage(corpus, {"kind": "char"}, imgs), f"--out-dir {imgs}", "train/cats")
    assert snapshot(imgs) == before

    tokens = tmp_path / "tokens"
    assert tokenize_stage(corpus, {"kind": "char"}, tokens).returncode == 0
    mytok = tmp_path / "mytok"
    mytok.mkdir()
    shutil.copy(tokens / "tokenizer.json", mytok / "tokenizer.json")
    before = snapshot(mytok)
    cfg = {"kind": "file", "path": str(mytok / "tokenizer.json")}
    one_line_refusal(tokenize_stage(corpus, cfg, mytok), f"--out-dir {mytok}", "no manifest.json")
    assert snapshot(mytok) == before
    no_temporaries(tmp_path)

    assert tokenize_stage(corpus, {"kind": "char"}, tokens).returncode == 0  # its own output
    for name in ("manifest.json", "tokenizer.json"):  # what Snakemake leaves before a rerun
        (tokens / name).unlink()
    assert tokenize_stage(corpus, {"kind": "char"}, tokens).returncode == 0 and (tokens / "manifest.json").is_file()


def corpus_damage(out: Path) -> None:
    (out / "corpus.json").write_text('{"project": "mine"}\n')


def corpus_user_lines(out: Path) -> None:
    (out / "val.jsonl").write_text(json.dumps({"text": "held", "label": 1}) + "\n")


def corpus_user_json(out: Path) -> None:
    (out / "corpus.json").write_text("my notes\n")


def tokens_other_tokenizer(out: Path) -> None:
    (out / "tokenizer.json").write_text('{"version": "1.0", "model": {}}\n')


def tokens_not_arrow(out: Path) -> None:
    (out / "val" / "shard-00000.arrow").write_bytes(b"PAR1 a user's file")


def tokens_unlisted_shard(out: Path) -> None:
    shutil.copy(out / "train" / "shard-00000.arrow", out / "train" / "shard-00009.arrow")


def tokens_user_manifest(out: Path) -> None:
    (out / "manifest.json").write_text('{"files": ["a", "b"]}\n')


@pytest.mark.parametrize("stage, damage, words", [
    ("corpus", corpus_damage, "its corpus.json has no 'name'"),
    ("corpus", corpus_user_json, "its corpus.json is not valid JSON"),
    ("corpus", corpus_user_lines, 'val.jsonl does not start with a line {"text": …} of this stage'),
    ("tokenize", tokens_other_tokenizer, "its tokenizer.json is not the one its manifest.json records"),
    ("tokenize", tokens_not_arrow, "val/shard-00000.arrow is not an Arrow IPC file"),
    ("tokenize", tokens_unlisted_shard, "its manifest.json does not list train/shard-00009.arrow"),
    ("tokenize", tokens_user_manifest, "its manifest.json is not a 'lipflow-token-shards/1' manifest"),
])
def test_a_folder_of_the_stages_names_with_other_contents_is_refused(corpus, tmp_path, stage, damage, words):
    """An earlier output with a file of the same name but other contents (a user's) is refused before
    any work, naming --out-dir, the folder and what is not the stage's; every byte stays."""
    from lipflow.data.corpus import CorpusConfig, build_corpus
    from lipflow.data.tokenize import TokenizerConfig, tokenize_corpus

    out = tmp_path / stage
    if stage == "corpus":
        build = lambda: build_corpus(CorpusConfig.from_dict(json.loads((corpus / "corpus.json").read_text())["config"]),
                                     out)
    else:
        build = lambda: tokenize_corpus(TokenizerConfig.from_dict({"kind": "char"}), corpus, out)
    build()
    build()  # unchanged, it is the stage's own
    damage(out)
    before = snapshot(out)
    with pytest.raises(FileExistsError) as refused:
        build()
    assert str(refused.value) == (f"--out-dir {out} is not this stage's earlier output ({words}); refusing to "
                                  "replace the directory (choose another output directory or move it away)")
    assert snapshot(out) == before
    no_temporaries(tmp_path)


def test_a_shard_size_far_above_the_corpus_costs_only_its_tokens(corpus, tmp_path):
    """tokenizer.shard_tokens = 2⁴⁸ (the schema's largest) used to allocate the whole shard up front
    (a 256 TiB array, a numpy traceback); now each split is one shard of the tokens there are."""
    done = tokenize_stage(corpus, {"kind": "char", "shard_tokens": 2**48}, tmp_path / "big")
    assert done.returncode == 0, done.stderr
    manifest = json.loads((tmp_path / "big" / "manifest.json").read_text())
    for split, info in manifest["splits"].items():
        assert [s["file"] for s in info["shards"]] == [f"{split}/shard-00000.arrow"]
        assert info["shards"][0]["num_tokens"] == info["num_tokens"] > 0


def test_a_shard_buffer_larger_than_memory_is_one_line(corpus, tmp_path, monkeypatch, capsys):
    """A MemoryError while a shard grows is one line naming tokenizer.shard_tokens, exit 2, no output."""
    from lipflow.data import tokenize

    real_empty = np.empty

    def empty(shape, *args, **kwargs):
        if isinstance(shape, (int, np.integer)) and shape > 1024:
            raise MemoryError("Unable to allocate")
        return real_empty(shape, *args, **kwargs)

    monkeypatch.setattr(tokenize, "SHARD_BUFFER", 1024, raising=False)
    monkeypatch.setattr(np, "empty", empty)
    argv = ["--corpus-dir", str(corpus), "--config-json", json.dumps({"kind": "char", "shard_tokens": 2**40}),
            "--out-dir", str(tmp_path / "tokens")]
    assert run_guarded(lambda: tokenize.main(argv)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lipflow: error: tokenizer.shard_tokens: out of memory"), err
    assert list(tmp_path.iterdir()) == []


def without_unk(kind: str, path: Path) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers

    model = {"BPE": lambda: models.BPE({"t": 0, "h": 1, "e": 2, "a": 3}, []),  # would drop unseen characters
             "WordLevel": lambda: models.WordLevel({"the": 0, "a": 1}),
             "WordPiece": lambda: models.WordPiece({"the": 0, "a": 1}),
             "Unigram": lambda: models.Unigram([("the", -1.0), ("a", -2.0)], unk_id=None)}[kind]()
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path))
    return str(path)


@pytest.mark.parametrize("kind", ["BPE", "WordLevel", "WordPiece", "Unigram"])
def test_a_tokenizer_file_without_an_unknown_token_is_refused_when_loaded(corpus, tmp_path, capsys, kind):
    """Such a model raises a bare Exception (with a traceback, from the worker thread) at the first word
    outside its vocabulary, or (BPE) drops such characters from the shards and prompts without a word;
    it is refused up front in one line naming tokenizer.path, the file and why."""
    from lipflow.data.tokenize import main

    path = without_unk(kind, tmp_path / "wl.json")
    argv = ["--corpus-dir", str(corpus), "--config-json", json.dumps({"kind": "file", "path": path}),
            "--out-dir", str(tmp_path / "tokens")]
    assert run_guarded(lambda: main(argv)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"lipflow: error: tokenizer.path: {path} has a {kind} model")
    assert "unknown token" in err and "cannot encode" in err
    assert not (tmp_path / "tokens").exists()


@pytest.mark.parametrize("kind", ["BPE", "WordLevel", "WordPiece", "Unigram"])
def test_the_unknown_token_id_is_what_text_outside_the_vocabulary_encodes_to(kind):
    """``unknown_token_id`` is the id an unseen word encodes to, for every model kind: a Unigram model
    names its unknown token by ``unk_id`` (no ``unk_token``), the others by ``unk_token``; words of the
    vocabulary never encode to it (``lipflow sample`` refuses a prompt holding it)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from lipflow.data.tokenize import unknown_token_id

    vocab = {"a": 0, "[UNK]": 1, "b": 2}  # one-letter words: BPE without merges encodes letter by letter
    model = {"BPE": lambda: models.BPE(vocab, [], unk_token="[UNK]"),
             "WordLevel": lambda: models.WordLevel(vocab, unk_token="[UNK]"),
             "WordPiece": lambda: models.WordPiece(vocab, unk_token="[UNK]"),
             "Unigram": lambda: models.Unigram([("a", -1.0), ("[UNK]", 0.0), ("b", -2.0)], unk_id=1)}[kind]()
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    assert unknown_token_id(tokenizer) == 1
    assert tokenizer.encode("a 日 b").ids == [0, 1, 2]
    assert unknown_token_id(Tokenizer(models.BPE({"a": 0}, []))) is None  # no unknown token: unseen text is dropped


def test_an_encoding_error_names_the_tokenizer(tmp_path):
    """Whatever else the Rust side raises while encoding is a DataError naming the tokenizer (the stage
    passes 'tokenizer.path: <file>'), not a bare Exception from the worker thread."""
    from tokenizers import Tokenizer

    from lipflow.data.tokenize import encode_stream

    tokenizer = Tokenizer.from_file(without_unk("WordLevel", tmp_path / "wl.json"))
    stream = encode_stream(tokenizer, iter(["the a", "the cat"] * 3), 2, 0, np.dtype(np.uint8),
                           "tokenizer.path: wl.json")
    with pytest.raises(DataError, match=r"^tokenizer\.path: wl\.json cannot encode a document \(.*UNK"):
        list(stream)


def test_a_lone_surrogate_in_a_jsonl_line_names_the_file_and_line(tmp_path):
    r"""{"text": "\ud800"} is valid JSON but no Unicode text: UTF-8 cannot write it. One line naming
    the file and line (was: "'utf-8' codec can't encode character ..." with neither)."""
    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"text": "fine"}\n{"text": "a pair \\ud83d\\ude00 is fine"}\n{"text": "bad \\ud800 here"}\n')
    done = corpus_stage({"name": "s", "source": "jsonl", "paths": ["docs.jsonl"]}, Path("out"), tmp_path)
    line = one_line_refusal(done, "docs.jsonl:3: text column 'text'", "lone surrogate \\ud800 at character 5")
    assert "codec" not in line
    assert not (tmp_path / "out").exists()
    no_temporaries(tmp_path)


def test_a_parquet_string_column_that_is_not_utf8_names_the_file_and_row(tmp_path):
    """Parquet does not check a string column's bytes; decoding one that is not UTF-8 is one line
    naming the file, the column and the row (was: "'utf-8' codec can't decode byte 0xff ...")."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    values = pa.array([b"fine text"] * 1500 + [b"\xff bad"], pa.binary()).view(pa.string())
    pq.write_table(pa.table({"text": values}), tmp_path / "docs.parquet")
    done = corpus_stage({"name": "s", "source": "parquet", "paths": ["docs.parquet"]}, Path("out"), tmp_path)
    one_line_refusal(done, "docs.parquet: text column 'text' is not UTF-8 (row 1500)")
    assert not (tmp_path / "out").exists()


CLUTTER = [".DS_Store", "._manifest.json", "Thumbs.db", ".nfs0000000000a1b2c300000001"]


def test_files_that_tools_leave_in_any_folder_do_not_stop_a_rerun(corpus, tmp_path, tiny_run_config, char_shards):
    """Finder, Windows, Jupyter and NFS put files into folders by themselves; a stage rerun over its own
    output with them there (at the top, in the shard folders, in a run folder) succeeds, where a file of
    another name is still refused."""
    from lipflow.train.build import check_run_directory

    out = tmp_path / "tok"
    assert tokenize_stage(corpus, {"kind": "char"}, out).returncode == 0
    for folder in (out, out / "train"):
        for name in CLUTTER:
            (folder / name).write_bytes(b"\0")
        (folder / ".ipynb_checkpoints").mkdir()
    assert tokenize_stage(corpus, {"kind": "char"}, out).returncode == 0
    assert (out / "manifest.json").is_file() and not (out / ".DS_Store").exists()  # swapped in whole
    (out / "notes.txt").write_text("mine")
    one_line_refusal(tokenize_stage(corpus, {"kind": "char"}, out), "--out-dir", "notes.txt")

    again = tmp_path / "corpus"
    cfg = {"name": "tiny", "source": "jsonl", "paths": [str(corpus.parent / "docs.jsonl")]}
    assert corpus_stage(cfg, again, tmp_path).returncode == 0
    for name in CLUTTER:
        (again / name).write_bytes(b"\0")
    assert corpus_stage(cfg, again, tmp_path).returncode == 0

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in CLUTTER:
        (run_dir / name).write_bytes(b"\0")
    (run_dir / ".ipynb_checkpoints").mkdir()
    check_run_directory(run_dir, "tiny-00000000", tiny_run_config)
    (run_dir / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        check_run_directory(run_dir, "tiny-00000000", tiny_run_config)


def test_a_bpe_model_that_encodes_every_character_is_accepted():
    """Byte fallback with all 256 <0xNN> tokens, or a ByteLevel pre-tokenizer (alone or in a Sequence, as
    lipflow's `bpe` kind and GPT-2 have) with all 256 byte symbols in the vocabulary, encodes any text, so
    only a BPE without either and without an unknown token is refused."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from lipflow.data.tokenize import BYTE_FALLBACK_TOKENS, unknown_token_problem

    assert unknown_token_problem(Tokenizer(models.BPE({"a": 0}, []))) is not None
    bytes_vocab = {token: i for i, token in enumerate(BYTE_FALLBACK_TOKENS)}
    assert unknown_token_problem(Tokenizer(models.BPE(bytes_vocab, [], byte_fallback=True))) is None
    assert unknown_token_problem(Tokenizer(models.BPE({"a": 0, "?": 1}, [], unk_token="?"))) is None
    alphabet_vocab = {symbol: i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    byte_level = Tokenizer(models.BPE(alphabet_vocab, []))
    byte_level.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(), pre_tokenizers.ByteLevel()])
    assert unknown_token_problem(byte_level) is None


def test_a_bpe_model_whose_fallback_lacks_byte_tokens_is_refused():
    """Byte fallback without the <0xNN> tokens, or a ByteLevel pre-tokenizer over a vocabulary without
    every byte symbol, drops a character it cannot spell without a word ('c' of "abc" encoded as "ab"):
    such a tokenizer.json is refused like a BPE with neither."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from lipflow.data.tokenize import unknown_token_problem

    fallback = Tokenizer(models.BPE({"a": 0, "b": 1, "<0x00>": 2}, [], byte_fallback=True))
    assert fallback.encode("abc").tokens == ["a", "b"]  # the character lost
    assert "byte fallback" in unknown_token_problem(fallback)
    byte_level = Tokenizer(models.BPE({"a": 0, "b": 1}, []))
    byte_level.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    assert byte_level.encode("abc").tokens == ["a", "b"]
    assert "ByteLevel" in unknown_token_problem(byte_level)

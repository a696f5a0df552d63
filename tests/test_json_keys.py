"""A JSON file of lipflow's that lacks a key the next stage reads is refused in one line naming the file
(README, Failure behaviour): a bare KeyError printed only the key."""

from __future__ import annotations

import json

import pytest

from lipflow.data.tokenize import read_corpus_summary
from lipflow.errors import DataError
from lipflow.evaluation.__main__ import evaluate


def test_a_run_json_without_status_is_refused_naming_it(tmp_path):
    run_dir = tmp_path / "a-0000000a"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"run_id": "a-0000000a"}))
    with pytest.raises(ValueError, match=rf"^{run_dir / 'run.json'}: missing key 'status'$"):
        evaluate("val", run_dir, tmp_path / "no-data", {}, tmp_path / "val.parquet")
    assert not (tmp_path / "val.parquet").exists()


CORPUS = {"name": "c", "source": {"kind": "files"}, "splits": {"train": {"bytes": 10}, "val": {"bytes": 3}}}


@pytest.mark.parametrize("damage", [
    lambda c: c.pop("splits"), lambda c: c["splits"].pop("val"), lambda c: c["splits"]["train"].pop("bytes"),
    lambda c: c["splits"]["val"].update(bytes="3"), lambda c: c.pop("name"), lambda c: c.pop("source")])
def test_a_corpus_json_without_what_tokenizing_reads_is_refused_naming_it(tmp_path, damage):
    path = tmp_path / "corpus.json"
    path.write_text(json.dumps(CORPUS))
    assert read_corpus_summary(path) == CORPUS
    damaged = json.loads(json.dumps(CORPUS))
    damage(damaged)
    path.write_text(json.dumps(damaged))
    with pytest.raises(DataError, match=rf"^{path} lacks the corpus name, source or a split's byte count"):
        read_corpus_summary(path)


@pytest.mark.parametrize("tokenizer", [None, "tokenizer.json", {"file": "tokenizer.json"}, {"sha256": "ab"},
                                       {"file": 3, "sha256": "ab"}])
def test_a_manifest_without_its_tokenizer_file_or_checksum_is_refused_naming_it(char_shards, tmp_path, tokenizer):
    import shutil

    from lipflow.data.loader import load_tokenizer

    shards = tmp_path / "shards"
    shutil.copytree(char_shards, shards)
    assert load_tokenizer(shards).get_vocab_size() > 0
    manifest = json.loads((shards / "manifest.json").read_text())
    (shards / "manifest.json").write_text(json.dumps({**manifest, "tokenizer": tokenizer}))
    with pytest.raises(DataError, match=rf"^{shards / 'manifest.json'}: 'tokenizer' lacks its file or sha256"):
        load_tokenizer(shards)


def test_a_run_config_without_a_key_evaluates_at_its_default_as_its_model_was_built(char_shards, tiny_run_config,
                                                                                    tmp_path):
    """A run whose config (config.json and the sealed weights' copy alike) lacks a key, as one written before the
    key existed, is built with the key's default (load_model), but the evaluation looked the key up in the
    config as written: a KeyError, `missing key 'context'` (a plain KeyError is a bug's now, with its
    traceback). It evaluates as the run with the default written out does, row for row."""
    import shutil

    import pyarrow.parquet as pq

    from conftest import train_here
    from lipflow.train.checkpoint import load_weights, save_weights

    cfg = {**tiny_run_config, "context": 64, "steps": 2, "eval_every": 2}  # 64: the schema's default
    written, older = tmp_path / "written-00000000", tmp_path / "older-00000000"
    assert train_here(cfg, char_shards, written, run_id=written.name) == 0
    shutil.copytree(written, older)
    for path in (older / "run.json", older / "config.json"):
        path.write_text(path.read_text().replace(written.name, older.name))
    info = json.loads((older / "config.json").read_text())
    del info["config"]["context"]
    (older / "config.json").write_text(json.dumps(info))
    tensors, meta = load_weights(older / "model.safetensors")
    save_weights(older / "model.safetensors", tensors, {**meta, "config": info["config"]})
    rows = {}
    for run_dir in (written, older):
        assert evaluate("val", run_dir, char_shards, {}, tmp_path / f"{run_dir.name}.parquet") == 0
        rows[run_dir.name] = pq.read_table(tmp_path / f"{run_dir.name}.parquet").drop(["run_id"]).to_pylist()
    assert rows[older.name] == rows[written.name] and len(rows[written.name]) > 0

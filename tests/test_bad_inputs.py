"""The bad-input catalog: each case gives one clear line naming the thing, exit ≠ 0, no partial
output, and earlier results untouched."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import run_stage, stage_here
from lipflow.studies.icl.tables import TABLE_SCHEMAS

def set_up_with(module: str, *args: str, cwd: Path | None = None) -> None:
    """Set a case up with stage ``module`` in this process (the stage under test still runs as `python -m`)."""
    code = stage_here(module, *args, cwd=cwd)
    assert code == 0, f"{module} exited {code} (its error is in the captured stderr)"


def config_case(text: str | bytes):
    def prepare(tmp: Path, shards: Path, run_cfg: dict):
        (tmp / "config.yaml").write_bytes(text if isinstance(text, bytes) else text.encode())
        return "lipflow.cli", ["runs", "--configfile", str(tmp / "config.yaml")], None
    return prepare


def corpus_case(files: dict[str, bytes], block: dict):
    def prepare(tmp: Path, shards: Path, run_cfg: dict):
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        cfg = {"name": "bad", **{k: [str(tmp / p) for p in v] if k == "paths" else v for k, v in block.items()}}
        out = tmp / "results" / "corpus"
        return "lipflow.data.corpus", ["--config-json", json.dumps(cfg), "--out-dir", str(out)], out
    return prepare


def tokenizer_case(block: dict, val_line: str | None = None):
    """The tokenize stage on the fixture's corpus; ``val_line``: a copy of it whose val.jsonl ends with that line."""
    def prepare(tmp: Path, shards: Path, run_cfg: dict):
        out = tmp / "results" / "tok"
        corpus = shards.parent / "corpus"
        if val_line is not None:
            corpus = Path(shutil.copytree(corpus, tmp / "corpus"))
            with open(corpus / "val.jsonl", "a", encoding="utf-8") as f:
                f.write(val_line + "\n")
        return "lipflow.data.tokenize", ["--corpus-dir", str(corpus), "--config-json", json.dumps(block),
                                         "--out-dir", str(out)], out
    return prepare


def merge_case(tables: list[tuple[str, str | None, str | None]], merged: list[str], text_n=(),
               out: str = "evals.parquet"):
    """``merge-evals`` of the named files, each written (with its checksum) as an evaluation table of
    (run id, evaluation) with a parameter column ``n`` or, with None, a table of one unrelated column;
    ``text_n``: the files whose ``n`` is text instead of a number."""
    def case(tmp: Path, shards: Path, checkpoint: Path):
        from lipflow.data.parquet import write_table_parquet

        for name, run_id, evaluation in tables:
            n = "1" if name in text_n else 1
            table = (pa.table({"x": [1]}) if run_id is None else
                     pa.table({"run_id": [run_id], "eval": [evaluation], "metric": ["loss"], "value": [1.0], "n": [n]}))
            write_table_parquet(tmp / f"{name}.parquet", table)
        out_path = tmp / out
        return ("lipflow.results", ["merge-evals", "--run-id", "r-0000000a", "--out", str(out_path),
                                    *(str(tmp / f"{n}.parquet") for n in merged)], out_path)
    return case


def train_case(overrides: dict, data=None, out_dir=None):
    def prepare(tmp: Path, shards: Path, run_cfg: dict):
        data_dir = data(tmp, shards) if data else shards
        out = Path(out_dir) if out_dir else tmp / "results" / "run"
        args = ["--run-id", "bad-00000000", "--config-json", json.dumps({**run_cfg, **overrides}),
                "--data-dir", str(data_dir), "--out-dir", str(out), "--no-progress"]
        return "lipflow.train", args, out  # a failed run leaves no run directory, not even an empty one
    return prepare


def results_db(tmp: Path) -> Path:
    """A small results database: a ``runs`` table and a view on it."""
    import duckdb

    db = tmp / "results" / "lipflow.duckdb"
    db.parent.mkdir(exist_ok=True)
    with duckdb.connect(str(db)) as con:
        con.execute("CREATE TABLE runs AS SELECT 'a-00000000' AS run_id, 1.5 AS val_loss")
        con.execute("CREATE VIEW best AS SELECT * FROM runs ORDER BY val_loss LIMIT 1")
    return db


def query_case(sql: str, writes: str | None = None):
    """``lipflow query sql`` on a results database; ``writes`` names a file the SQL tries to create."""
    def prepare(tmp: Path, shards: Path, run_cfg: dict):
        db = results_db(tmp)
        return "lipflow.cli", ["query", sql.format(tmp=tmp), "--db", str(db)], tmp / writes if writes else None
    return prepare


def corrupt_shard(tmp: Path, shards: Path) -> Path:
    copy = tmp / "shards"
    shutil.copytree(shards, copy)
    shard = copy / "train" / "shard-00000.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    return copy


def eval_case(make_run):
    def prepare(tmp: Path, shards: Path, run_cfg: dict):
        run_dir = make_run(tmp, shards, run_cfg)
        out = tmp / "results" / "evals" / "val.parquet"
        out.parent.mkdir(parents=True, exist_ok=True)  # as Snakemake makes an output's folder
        return "lipflow.evaluation", ["--evaluation", "val", "--run-dir", str(run_dir), "--data-dir", str(shards),
                                      "--out", str(out), "--device", "cpu"], out
    return prepare


def seeded_model(cfg: dict, vocab: int) -> torch.nn.Module:
    """``build_model(cfg, vocab)`` initialised from ``cfg["seed"]``, whatever the tests before it drew: the
    weights of a fake run (and the tokens a greedy sample of it draws) are the same in every session."""
    from lipflow.model import build_model

    with torch.random.fork_rng():
        torch.manual_seed(cfg["seed"])
        return build_model(cfg, vocab)


def fake_run(tmp: Path, run_cfg: dict, vocab: int, model: str, weights_of: str) -> Path:
    """A finished-looking run directory whose checkpoint was made for ``weights_of``."""
    from lipflow.train.checkpoint import save_weights

    run_dir = tmp / "fake_run"
    run_dir.mkdir()
    built = seeded_model({**run_cfg, "model": weights_of}, vocab)
    save_weights(run_dir / "model.safetensors", built.state_dict(), {"config": {**run_cfg, "model": weights_of}})
    (run_dir / "config.json").write_text(json.dumps({"vocab_size": vocab, "data_dir": "", "config": {**run_cfg, "model": model}}))
    (run_dir / "run.json").write_text(json.dumps({"run_id": "fake-00000000", "status": "completed"}))
    return run_dir


def vocab_mismatch(tmp, shards, run_cfg):
    return fake_run(tmp, run_cfg, vocab=7, model="gpt", weights_of="gpt")


def other_architecture(tmp, shards, run_cfg):
    vocab = json.loads((shards / "manifest.json").read_text())["vocab_size"]
    return fake_run(tmp, run_cfg, vocab=vocab, model="lipschitz_gpt", weights_of="gpt")


def pickled_checkpoint(tmp, shards, run_cfg):
    """A pickle under a checkpoint's name, with a matching sidecar (whoever writes one can write both)."""
    run_dir = other_architecture(tmp, shards, run_cfg)
    torch.save({"w": torch.ones(2)}, run_dir / "model.safetensors")
    digest = hashlib.sha256((run_dir / "model.safetensors").read_bytes()).hexdigest()
    (run_dir / "model.safetensors.sha256").write_text(digest + "\n")
    return run_dir


def missing_sidecar(tmp, shards, run_cfg):
    run_dir = real_fake_run(tmp, shards, run_cfg)
    (run_dir / "model.safetensors.sha256").unlink()
    return run_dir


def flipped_weights(tmp, shards, run_cfg):
    run_dir = real_fake_run(tmp, shards, run_cfg)
    data = bytearray((run_dir / "model.safetensors").read_bytes())
    data[-5] ^= 0x10
    (run_dir / "model.safetensors").write_bytes(bytes(data))
    return run_dir


def edited_n_heads(tmp, shards, run_cfg):
    run_dir = real_fake_run(tmp, shards, run_cfg)
    info = json.loads((run_dir / "config.json").read_text())
    info["config"]["n_heads"] = 1
    (run_dir / "config.json").write_text(json.dumps(info))
    return run_dir


def truncated_config_json(tmp, shards, run_cfg):
    run_dir = real_fake_run(tmp, shards, run_cfg)
    (run_dir / "config.json").write_text((run_dir / "config.json").read_text()[:40])
    return run_dir


def truncated_run_json(tmp, shards, run_cfg):
    run_dir = real_fake_run(tmp, shards, run_cfg)
    (run_dir / "run.json").write_text('{"run_id": "fake-000')
    return run_dir


DEEP = '{"text": ' + "[" * 20_000 + "]" * 20_000 + "}"  # deeper than Python's recursion limit (1,000)


def deep_run_json(tmp, shards, run_cfg):
    run_dir = real_fake_run(tmp, shards, run_cfg)
    (run_dir / "run.json").write_text(DEEP)
    return run_dir


def deep_manifest(tmp: Path, shards: Path) -> Path:
    import shutil

    copy = tmp / "deep_data"
    shutil.copytree(shards, copy)
    (copy / "manifest.json").write_text(DEEP)
    return copy


def list_run_json(tmp, shards, run_cfg):
    run_dir = real_fake_run(tmp, shards, run_cfg)
    (run_dir / "run.json").write_text("[]")
    return run_dir


def run_json_without_key(tmp, shards, run_cfg):
    run_dir = real_fake_run(tmp, shards, run_cfg)
    (run_dir / "run.json").write_text("{}")
    return run_dir


def build_case(extra_args, out_name="db.duckdb", out_text=None, run=None):
    """``python -m lipflow.results build`` on the data shards' manifest and one run directory (``run``: how to
    make it, default :func:`real_fake_run`); ``out_text``: a user's file at --out."""
    def prepare(tmp: Path, shards: Path, run_cfg: dict):
        out = tmp / out_name
        if out_text is not None:
            out.write_text(out_text)
        run_dir = (run or real_fake_run)(tmp, shards, run_cfg)
        args = [a.format(run=run_dir, tmp=tmp) for a in extra_args]
        return "lipflow.results", ["build", "--out", str(out), "--manifest", str(shards / "manifest.json"), *args], \
            None if out_text is not None else out
    return prepare


def edited_manifest(drop: str, **values):
    """A copy of the data dir whose manifest lacks ``drop`` (a top-level key, or ``shards`` of the train split;
    "" drops nothing) and has the top-level ``values``."""
    def data(tmp: Path, shards: Path) -> Path:
        import shutil

        copy = tmp / "edited_data"
        shutil.copytree(shards, copy)
        manifest = json.loads((copy / "manifest.json").read_text())
        if drop == "shards":
            del manifest["splits"]["train"]["shards"]
        elif drop:
            del manifest[drop]
        manifest.update(values)
        (copy / "manifest.json").write_text(json.dumps(manifest))
        return copy
    return data


def run_trained_on_other_shards(tmp: Path, shards: Path, run_cfg: dict) -> Path:
    """A run trained on a copy of ``shards`` whose manifest differs in its bytes (as another corpus's or
    tokenizer's would; the vocabulary size stays the same)."""
    import shutil

    other = tmp / "other_data"
    shutil.copytree(shards, other)
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps(manifest, indent=1))
    run_dir = tmp / "trained_elsewhere"
    set_up_with("lipflow.train", "--run-id", "bad-00000000", "--config-json", json.dumps(run_cfg),
                "--data-dir", str(other), "--out-dir", str(run_dir), "--no-progress")
    return run_dir


def real_fake_run(tmp, shards, run_cfg):
    """A run directory whose weights and config.json agree (with the vocabulary of ``shards``)."""
    from lipflow.train.checkpoint import save_weights

    vocab = json.loads((shards / "manifest.json").read_text())["vocab_size"]
    run_dir = fake_run(tmp, run_cfg, vocab=vocab, model="gpt", weights_of="gpt")
    save_weights(run_dir / "model.safetensors", seeded_model({**run_cfg, "model": "gpt"}, vocab).state_dict(),
                 {"config": {**run_cfg, "model": "gpt"}, "vocab_size": vocab})
    return run_dir


CASES = {
    "malformed_yaml": (config_case("runs:\n  a: {lr: 0.1\n"), "malformed YAML at line"),
    "config_not_utf8": (config_case(b"runs: {}\n# caf\xe9\n"), "config.yaml: not UTF-8 text (byte 14 is 0xe9)"),
    "unknown_key": (config_case("runs:\n  a: {lrr: 0.1}\n"), "unknown key 'runs.a.lrr' (did you mean 'lr'?)"),
    "repeated_merge_key": (config_case("runs:\n  a:\n    <<: {lr: 0.1}\n    steps: 5\n    <<: {lr: 0.2}\n"),
                           "config.yaml: malformed YAML at line 5, column 5: duplicate key '<<'"),
    "anchor_inside_itself": (config_case("runs: &r\n  a: *r\n  b: *r\n"),
                             "config.yaml: nested deeper than 64 levels (an anchor that refers to itself?)"),
    # 900 levels: past lipflow's 64 and within libyaml's own limit, which PyYAML 6.0.4's wheels set below 1000
    # flow levels ("malformed YAML ... exceeded maximum nesting depth" at 5000, before lipflow's check ran)
    "nesting_too_deep": (config_case("runs: " + "[" * 900 + "]" * 900 + "\n"), "config.yaml: nested deeper than"),
    "corpus_path_a_device": (config_case("corpus: {source: files, paths: [/dev/null]}\n"),
                             "corpus.paths: /dev/null is not a regular file"),
    "tokenizer_path_a_folder": (config_case("tokenizer: {kind: file, path: /tmp}\n"),
                                "tokenizer.path: /tmp is not a regular file"),
    "wrong_type": (config_case("defaults: {d_model: wide}\n"), "d_model: 'wide' is not of type 'integer'"),
    "negative_lr": (config_case("runs:\n  a: {lr: -0.1}\n"), "runs.a.lr: -0.1 is less than or equal to the minimum of 0"),
    "sigma_max_zero": (config_case("runs:\n  a: {sigma_max: 0}\n"), "runs.a.sigma_max: 0 is less than the minimum of 1e-30"),
    "zero_steps": (config_case("runs:\n  a: {steps: 0}\n"), "runs.a.steps: 0 is less than the minimum of 1"),
    "unknown_enum": (config_case("runs:\n  a: {weight_constraint: soft_cap}\n"), "runs.a.weight_constraint: 'soft_cap' is not one of"),
    "one_hutchinson_sample": (config_case("evaluations:\n  sharpness: {hutchinson_samples: 1}\n"),
                              "evaluations.sharpness.hutchinson_samples: 1 sample gives no standard error"),
    "lanczos_k_above_iters": (config_case("evaluations:\n  sharpness: {lanczos_k: 5, lanczos_iters: 4}\n"),
                              "evaluations.sharpness.lanczos_k: 5 eigenvalues need at least as many Lanczos steps"),
    "run_name_injection": (config_case("runs:\n  \"x'; drop table runs;--\": {}\n"), "is not allowed"),
    "run_name_escape": (config_case("runs:\n  ../../etc: {}\n"), "is not allowed"),
    "config_file_not_a_mapping": (config_case("- runs\n- defaults\n"), "config.yaml: a config file holds a mapping "
                                                                     "of keys at its top level, not a list"),
    "missing_config_file": (lambda tmp, s, c: ("lipflow.cli", ["runs", "--configfile", str(tmp / "nope.yaml")], None),
                            "config file"),
    "empty_corpus": (corpus_case({"empty.txt": b"  \n\n"}, {"source": "files", "paths": ["empty.txt"]}), "empty"),
    "binary_corpus": (corpus_case({"blob.txt": b"abc\x00\x01\x02"}, {"source": "files", "paths": ["blob.txt"]}), "blob.txt"),
    "non_utf8_corpus": (corpus_case({"latin.txt": "café".encode("latin-1")}, {"source": "files", "paths": ["latin.txt"]}),
                        "latin.txt"),
    "missing_corpus_file": (corpus_case({}, {"source": "files", "paths": ["absent.txt"]}), "absent.txt"),
    "jsonl_bad_line": (corpus_case({"d.jsonl": b'{"text": "a"}\n{oops\n'}, {"source": "jsonl", "paths": ["d.jsonl"]}),
                       "d.jsonl:2"),
    "parquet_missing_column": (lambda tmp, s, c: (pq.write_table(pa.table({"body": ["x"]}), tmp / "d.parquet"),
                                                  corpus_case({}, {"source": "parquet", "paths": ["d.parquet"]})(tmp, s, c))[1],
                               "text"),
    "missing_tokenizer_file": (tokenizer_case({"kind": "file", "path": "/nonexistent/tokenizer.json"}), "tokenizer.json"),
    "unknown_registry_name": (train_case({"optimizer": "muonn"}),
                              "--config-json.optimizer: 'muonn' is not one of adamw, muon, scion, uscg (did you mean 'muon'?)"),
    "train_unknown_key": (train_case({"stepz": 3}), "unknown key '--config-json.stepz' (did you mean 'steps'?)"),
    "train_wrong_type": (train_case({"steps": "two"}), "--config-json.steps: 'two' is not of type 'integer'"),
    "train_heads_not_dividing": (train_case({"n_heads": 5}), "--config-json.n_heads: 5 does not divide d_model 32"),
    "train_config_not_json": (lambda tmp, s, c: ("lipflow.train", ["--run-id", "bad-00000000", "--config-json", "{steps: 3}",
                                                                  "--data-dir", str(s), "--out-dir", str(tmp / "run")],
                                                 tmp / "run"), "--config-json is not valid JSON"),
    "train_missing_shards": (train_case({}, data=lambda tmp, shards: tmp / "nowhere"), "no token shards at"),
    "train_unknown_option": (lambda tmp, s, c: ("lipflow.train", ["--run-id", "bad-00000000", "--config-json", "{}",
                                                                 "--data-dir", str(s), "--out-dir", str(tmp / "run"),
                                                                 "--stepz", "3"], tmp / "run"),
                             "unrecognized arguments: --stepz 3 (see python -m lipflow.train --help)"),
    "eval_params_not_json": (lambda tmp, s, c: ("lipflow.evaluation", ["--evaluation", "val", "--run-dir", str(tmp),
                                                                      "--data-dir", str(s), "--params-json", "[1]",
                                                                      "--out", str(tmp / "val.parquet")],
                                                tmp / "val.parquet"), "--params-json must be a JSON object, got list"),
    "train_run_id_traversal": (lambda tmp, s, c: ("lipflow.train", ["--run-id", "../../evil", "--config-json", "{}",
                                                                   "--data-dir", str(s), "--out-dir", str(tmp / "run")],
                                                   tmp / "run"), "--run-id: '../../evil' is not a run id"),
    "sample_run_id_traversal": (lambda tmp, s, c: ("lipflow.cli", ["sample", "../../etc", "--prompt", "x"], None),
                                "run_id: '../../etc' is not a run id"),
    "icl_zero_layers": (lambda tmp, s, c: ("lipflow.studies.icl", ["train", "--config-json", "{}", "--layers", "0",
                                                                   "--n", "5", "--out", str(tmp / "m.safetensors")],
                                           tmp / "m.safetensors"), "argument --layers: '0' is not an integer ≥ 1"),
    "image_mlp_config_not_object": (lambda tmp, s, c: ("lipflow.studies.image_mlp", ["--config-json", "[]", "--out",
                                                                                     str(tmp / "r.parquet")],
                                                       tmp / "r.parquet"), "--config-json must be a JSON object, got list"),
    "corpus_line_text_null": (tokenizer_case({"kind": "char"}, val_line='{"text": null}'),
                              "val.jsonl:"),
    "float_shard_tokens": (tokenizer_case({"kind": "char", "shard_tokens": 2048.0}),
                           "tokenizer.shard_tokens: 2048.0 is not of type 'integer'"),
    "run_json_a_list": (build_case(["--run-dirs", "{run}"], run=list_run_json), "run.json holds a JSON list, not an object"),
    "run_json_missing_key": (build_case(["--run-dirs", "{run}"], run=run_json_without_key), "missing key"),
    "build_over_a_user_file": (build_case(["--run-dirs", "{run}"], out_name="notes.txt", out_text="mine"),
                               "exists and is not a lipflow database; refusing to replace it"),
    "build_run_dir_twice": (build_case(["--run-dirs", "{run}", "{run}/"]), "is given twice"),
    "build_manifest_without_splits": (lambda tmp, s, c: (
        "lipflow.results", ["build", "--out", str(tmp / "db.duckdb"), "--manifest",
                            str(edited_manifest("splits")(tmp, s) / "manifest.json")], tmp / "db.duckdb"),
        "edited_data/manifest.json has no 'splits' (truncated or edited?)"),
    "train_manifest_without_shards": (train_case({}, data=edited_manifest("shards")),
                                      "edited_data/manifest.json: split 'train' has no list of shards"),
    "train_manifest_vocab_edited": (train_case({}, data=edited_manifest("", vocab_size=20)),
                                    "edited_data/manifest.json: vocab_size 20, but its tokenizer.json has"),
    "build_receipt_folder_missing": (build_case(["--run-dirs", "{run}", "--receipt", "{tmp}/nowhere/db.built"]),
                                     "folder"),
    "merge_into_an_input": (lambda tmp, s, c: (pq.write_table(pa.table({"x": [1]}), tmp / "val.parquet"),
                                               ("lipflow.results", ["merge-evals", "--run-id", "r-0000000a", "--out",
                                                                    str(tmp / "val.parquet"), str(tmp / "val.parquet")],
                                                None))[1],
                            "is also one of the files to merge"),
    "merge_the_same_file_twice": (merge_case([("val", "r-0000000a", "val")], ["val", "val"]), "is given twice"),
    "merge_a_foreign_table": (merge_case([("notes", None, None)], ["notes"]),
                              "notes.parquet is not an evaluation table (it has no column 'run_id')"),
    "merge_two_runs": (merge_case([("a", "r-0000000a", "val"), ("b", "r-0000000b", "val")], ["a", "b"]),
                       "b.parquet holds rows of run 'r-0000000b', not of --run-id 'r-0000000a'"),
    "merge_one_evaluation_twice": (merge_case([("a", "r-0000000a", "val"), ("b", "r-0000000a", "val")], ["a", "b"]),
                                   "both hold evaluation 'val'"),
    "merge_clashing_types": (merge_case([("a", "r-0000000a", "val"), ("b", "r-0000000a", "rank")], ["a", "b"],
                                        text_n=["b"]), "the evaluation files cannot be merged"),
    "merge_into_a_missing_folder": (merge_case([("a", "r-0000000a", "val")], ["a"], out="nowhere/evals.parquet"),
                                    "nowhere/evals.parquet: folder"),
    "query_missing_sql": (lambda tmp, s, c: ("lipflow.cli", ["query"], None),
                          "the following arguments are required: sql (see lipflow query --help)"),
    "unknown_constraint": (train_case({"weight_constraint": "spectral_softcap"}), "did you mean 'spectral_soft_cap'?"),
    "context_longer_than_shards": (train_case({"context": 10_000_000}), "context 10000000 is longer than the"),
    "model_larger_than_memory": (train_case({"mlp_ratio": 2**44}),  # 2⁵⁸ bytes: beyond any address space
                                 "out of memory (can't allocate memory: you tried to allocate"),
    # 2⁴⁸ greedy candidates (the schema's maximum): 2⁵¹ bytes of positions, beyond a 47-bit address space (2⁴⁰, 8 TiB,
    # fits a 47-bit address space: under vm.overcommit_memory=1 malloc succeeds and filling it OOM-kills)
    "evaluation_larger_than_memory": (lambda tmp, s, c: (
        "lipflow.evaluation", ["--evaluation", "robustness", "--run-dir", str(real_fake_run(tmp, s, c)), "--data-dir",
                               str(s), "--out", str(tmp / "robustness.parquet"), "--device", "cpu", "--params-json",
                               json.dumps({"n_sequences": 1, "epsilons": [0], "k_values": [1],
                                           "greedy_candidates": 2**48})], tmp / "robustness.parquet"),
        "out of memory (can't allocate memory: you tried to allocate"),
    "corrupt_shard": (train_case({}, data=corrupt_shard), "sha256 mismatch"),
    "unwritable_results_dir": (train_case({}, out_dir="/proc/lipflow-results"), "/proc/lipflow-results"),
    "vocab_mismatch": (eval_case(vocab_mismatch), "tokenizer/checkpoint mismatch"),
    "evaluated_on_other_shards": (eval_case(run_trained_on_other_shards),
                                  "was trained on other token shards than"),
    "other_architecture": (eval_case(other_architecture), "holds a 'gpt' model but config.json says 'lipschitz_gpt'"),
    "pickled_checkpoint": (eval_case(pickled_checkpoint), "never unpickles"),
    "missing_weights_sidecar": (eval_case(missing_sidecar), "has no checksum file model.safetensors.sha256"),
    "flipped_weight_bits": (eval_case(flipped_weights), "model.safetensors is corrupt: sha256 does not match"),
    "edited_n_heads": (eval_case(edited_n_heads), "config.json does not match the config stored in model.safetensors "
                                                  "(differs in n_heads)"),
    "truncated_config_json": (eval_case(truncated_config_json), "config.json is not valid JSON"),
    "truncated_run_json": (eval_case(truncated_run_json), "run.json is not valid JSON"),
    # JSON nested past Python's recursion limit (json.loads raised RecursionError: a traceback, exit 1)
    "deep_run_json": (eval_case(deep_run_json), "run.json is not valid JSON (nested too deeply to read"),
    "deep_config_json_option": (lambda tmp, s, c: ("lipflow.train", ["--run-id", "bad-00000000", "--config-json", DEEP,
                                                                    "--data-dir", str(s), "--out-dir", str(tmp / "run")],
                                                   tmp / "run"), "--config-json is not valid JSON: nested too deeply"),
    "deep_corpus_line": (corpus_case({"d.jsonl": b'{"text": "a"}\n' + DEEP.encode() + b"\n"},
                                     {"source": "jsonl", "paths": ["d.jsonl"]}), "d.jsonl:2"),
    "deep_corpus_stage_line": (tokenizer_case({"kind": "char"}, val_line=DEEP), "val.jsonl:"),
    "deep_manifest": (train_case({}, data=deep_manifest), "corrupt manifest"),
    "char_device_corpus": (corpus_case({}, {"source": "files", "paths": ["/dev/zero"]}),
                           "/dev/zero is not a regular file"),
    "sample_temperature_nan": (lambda tmp, s, c: ("lipflow.cli", ["sample", "a-00000000", "--prompt", "x",
                                                                 "--temperature", "nan"], None),
                               "--temperature must be a finite number >= 0, got nan"),
    "query_empty": (query_case(""), "no SQL statement given"),
    "query_comment_only": (query_case("-- nothing"), "no SQL statement given"),
    "query_read_system_file": (query_case("SELECT * FROM read_csv('/etc/passwd')"), "table function read_csv() is not"),
    "query_read_text": (query_case("SELECT * FROM read_text('/etc/hostname')"), "table function read_text() is not"),
    "query_glob": (query_case("SELECT * FROM glob('/etc/*')"), "table function glob() is not allowed"),
    "query_copy_to": (query_case("COPY runs TO '{tmp}/copied.csv'", writes="copied.csv"), "not COPY"),
    "query_copy_in_select": (query_case("SELECT * FROM runs; COPY runs TO '{tmp}/copied.csv'", writes="copied.csv"),
                             "exactly one statement; got 2"),
    "query_attach": (query_case("ATTACH '{tmp}/new.duckdb' (READ_ONLY false)", writes="new.duckdb"), "not ATTACH"),
    "query_two_statements": (query_case("SELECT 1; SELECT 2"), "exactly one statement; got 2"),
    "query_pivot_without_values": (query_case("PIVOT runs ON model USING count(*)"), "a PIVOT must name its columns'"),
    "query_copy_of_a_pivot": (query_case("COPY (PIVOT runs ON model USING count(*)) TO '{tmp}/p.csv'", writes="p.csv"),
                              "a PIVOT must name its columns'"),
    "query_install": (query_case("install httpfs"), "statements, not INSTALL"),
    "query_load": (query_case("LOAD json"), "not LOAD"),
    "query_set": (query_case("SET enable_external_access = true"), "not SET"),
    "query_pragma": (query_case("PRAGMA enable_profiling"), "not PRAGMA"),
    "query_delete": (query_case("DELETE FROM runs"), "read-only"),
    "query_bad_sql": (query_case("SELEC 1"), "syntax error"),
    "query_not_a_database": (lambda tmp, s, c: ((tmp / "x.duckdb").write_text("hello"),
                                                ("lipflow.cli", ["query", "SELECT 1", "--db", str(tmp / "x.duckdb")],
                                                 None))[1], "x.duckdb"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gives_one_clear_line(case, char_shards, tiny_run_config, tmp_path):
    prepare, expected = CASES[case]
    earlier = tmp_path / "results" / "earlier.parquet"
    earlier.parent.mkdir(parents=True)
    pq.write_table(pa.table({"x": [1, 2, 3]}), earlier)
    before = earlier.read_bytes()
    module, args, output = prepare(tmp_path, char_shards, tiny_run_config)
    done = run_stage(module, *args, cwd=tmp_path)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode != 0
    assert len(lines) == 1, done.stderr
    assert expected in lines[0], lines[0]
    if output is not None:
        assert not Path(output).exists()
        leftovers = [p for p in Path(output).parent.glob(f".{Path(output).name}*")] if Path(output).parent.exists() else []
        assert leftovers == []
    assert earlier.read_bytes() == before


def user_duckdb(path: Path) -> Path:
    import duckdb

    with duckdb.connect(str(path)) as con:
        con.execute("CREATE TABLE secrets AS SELECT 42 AS x")
    return path


def annotated_database(tmp: Path, shards: Path) -> Path:
    """A database lipflow built, to which the user added a table of their own."""
    import duckdb

    path = tmp / "results.duckdb"
    done = run_stage("lipflow.results", "build", "--out", str(path), "--manifest", str(shards / "manifest.json"))
    assert done.returncode == 0, done.stderr
    with duckdb.connect(str(path)) as con:
        con.execute("CREATE TABLE my_notes AS SELECT 'run a-1 looked odd' AS note")
    return path


def other_run_dir(tmp: Path, shards: Path, run_cfg: dict) -> Path:
    """A finished run's directory, trained with another lr than run_cfg's."""
    out = tmp / "other_run"
    set_up_with("lipflow.train", "--run-id", "bad-00000000", "--config-json", json.dumps({**run_cfg, "lr": 0.5}),
                "--data-dir", str(shards), "--out-dir", str(out), "--no-progress")
    return out


def user_file(path: Path, data: str | bytes) -> Path:
    """A file of the user's at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def linked(link: Path, target: Path) -> Path:
    """``link`` made a symbolic link to ``target``; returns the folder holding the link."""
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)
    return link.parent


def user_files(folder: Path, contents: dict[str, str]) -> Path:
    """A folder of the user's holding ``contents`` (file name → text)."""
    for name, text in contents.items():
        user_file(folder / name, text)
    return folder


def evaluation_file(path: Path, run_id: str = "r-0000000a") -> Path:
    from lipflow.data.parquet import write_table_parquet

    write_table_parquet(path, pa.table({"run_id": [run_id], "eval": ["val"], "metric": ["loss"], "value": [1.0]}))
    return path


def killed(run_dir: Path) -> Path:
    """``run_dir`` as a killed run leaves it: checkpoints, none of the files the end of training writes."""
    for name in ("config.json", "run.json", "model.safetensors", "model.safetensors.sha256",
                 "train_metrics.parquet", "train_metrics.parquet.sha256"):
        (run_dir / name).unlink()
    return run_dir


def train_into(out_dir: Path, shards: Path, run_cfg: dict) -> tuple[str, list[str]]:
    return "lipflow.train", ["--run-id", "bad-00000000", "--config-json", json.dumps(run_cfg), "--data-dir",
                             str(shards), "--out-dir", str(out_dir), "--no-progress"]


def build_with(tmp: Path, shards: Path, run_cfg: dict, *extra: str) -> tuple[str, list[str]]:
    """A database build that succeeds (no runs) unless ``extra`` points it at a file it must not replace."""
    return "lipflow.results", ["build", "--manifest", str(shards / "manifest.json"), *extra]


# what a stage is pointed at → (module, args, the file it must leave as it was, the error's words)
NEVER_REPLACED = {
    "evaluation over a run's weights": lambda tmp, s, c: (
        "lipflow.evaluation", ["--evaluation", "val", "--run-dir", str(real_fake_run(tmp, s, c)), "--data-dir", str(s),
                               "--out", str(tmp / "fake_run" / "model.safetensors"), "--device", "cpu"],
        tmp / "fake_run" / "model.safetensors", "--out"),
    "merge-evals over a user's file": lambda tmp, s, c: (
        "lipflow.results", ["merge-evals", "--run-id", "r-0000000a", "--out", str(user_file(tmp / "notes.txt", "mine")),
                            str(evaluation_file(tmp / "a.parquet"))], tmp / "notes.txt", "--out"),
    "merge-evals over another run's table": lambda tmp, s, c: (
        "lipflow.results", ["merge-evals", "--run-id", "r-0000000b", "--out", str(evaluation_file(tmp / "evals.parquet")),
                            str(evaluation_file(tmp / "b.parquet", "r-0000000b"))],
        tmp / "evals.parquet", "holds the val rows of run r-0000000a; refusing to replace them with the rows of run "
                               "r-0000000b"),
    "build over another DuckDB database": lambda tmp, s, c: (
        *build_with(tmp, s, c, "--out", str(user_duckdb(tmp / "mine.duckdb"))), tmp / "mine.duckdb", "--out"),
    "build over a database holding a user's table": lambda tmp, s, c: (
        *build_with(tmp, s, c, "--out", str(annotated_database(tmp, s))), tmp / "results.duckdb",
        "holds table 'my_notes', which lipflow does not build"),
    "receipt over a JSON file": lambda tmp, s, c: (
        *build_with(tmp, s, c, "--out", str(tmp / "db.duckdb"), "--receipt",
                    str(user_file(tmp / "manifest.json", (s / "manifest.json").read_bytes()))),
        tmp / "manifest.json", "--receipt"),
    "receipt over a user's database": lambda tmp, s, c: (
        *build_with(tmp, s, c, "--out", str(tmp / "db.duckdb"), "--receipt", str(user_duckdb(tmp / "u.duckdb"))),
        tmp / "u.duckdb", "--receipt"),
    "train over another run": lambda tmp, s, c: (
        *train_into(other_run_dir(tmp, s, c), s, c), tmp / "other_run" / "model.safetensors", "differs in lr"),
    "train over another run's checkpoints": lambda tmp, s, c: (
        *train_into(killed(other_run_dir(tmp, s, c)), s, c),
        max((tmp / "other_run" / "checkpoints").glob("step-*.safetensors")), "another run's checkpoint"),
    "train over a user's config.json": lambda tmp, s, c: (
        *train_into(user_file(tmp / "notes" / "config.json", "my notes").parent, s, c),
        tmp / "notes" / "config.json", "--out-dir"),
    "train over a user's run.json and weights": lambda tmp, s, c: (
        *train_into(user_files(tmp / "mine", {"run.json": "my notes", "model.safetensors": "my weights"}), s, c),
        tmp / "mine" / "model.safetensors", "but no config.json"),
    "train with checkpoints linked to a user's folder": lambda tmp, s, c: (
        *train_into(linked(tmp / "run" / "checkpoints", user_files(tmp / "mine", {"step-000000001.safetensors": "x"})),
                    s, c), tmp / "mine" / "step-000000001.safetensors", "checkpoints is a link"),
    "train over a user's file in checkpoints": lambda tmp, s, c: (
        *train_into(user_file(tmp / "run" / "checkpoints" / "step-1.safetensors", "mine").parent.parent, s, c),
        tmp / "run" / "checkpoints" / "step-1.safetensors", "checkpoints holds 'step-1.safetensors', which lipflow"),
    "train into a folder of the user's": lambda tmp, s, c: (
        *train_into(user_file(tmp / "thesis" / "draft.tex", "chapter 1").parent, s, c),
        tmp / "thesis" / "draft.tex", "holds 'draft.tex', which no lipflow stage writes there"),
    "evaluation over a user's checksum-named file": lambda tmp, s, c: (
        "lipflow.evaluation", ["--evaluation", "val", "--run-dir", str(real_fake_run(tmp, s, c)), "--data-dir", str(s),
                               "--out", str(tmp / "val.parquet"), "--device", "cpu"],
        user_file(tmp / "val.parquet.sha256", "my notes"), "checksum file"),
    "image_mlp study over a user's file": lambda tmp, s, c: (
        "lipflow.studies.image_mlp", ["--config-json", "{}", "--out", str(user_file(tmp / "mine.parquet", "data"))],
        tmp / "mine.parquet", "--out"),
    "ICL baselines over a user's file": lambda tmp, s, c: (
        "lipflow.studies.icl", ["baselines", "--config-json", "{}", "--out", str(user_file(tmp / "b.parquet", "data"))],
        tmp / "b.parquet", "--out"),
    "ICL collect over a user's table": lambda tmp, s, c: (
        "lipflow.studies.icl", ["collect", "--config-json", "{}", "--baselines", "b.parquet", "--runs", "r.safetensors",
                                "--out-dir", str(user_file(tmp / "icl" / f"{ICL_TABLE}.parquet", "data").parent)],
        tmp / "icl" / f"{ICL_TABLE}.parquet", "--out-dir"),
    "ICL check over a user's JSON": lambda tmp, s, c: (
        "lipflow.studies.icl", ["check", "--config-json", "{}", "--results-dir", str(tmp), "--out",
                                str(user_file(tmp / "summary.json", '{"mine": 1}'))],
        tmp / "summary.json", "--out"),
}
ICL_TABLE = next(iter(TABLE_SCHEMAS))  # one of the tables ICL collect writes


@pytest.mark.parametrize("case", sorted(NEVER_REPLACED))
def test_a_stage_never_replaces_a_file_it_did_not_write(case, char_shards, tiny_run_config, tmp_path):
    """Pointed at a file that is not its own earlier output, a stage refuses with one line naming the
    option, and the file keeps its bytes."""
    module, args, protected, words = NEVER_REPLACED[case](tmp_path, char_shards, tiny_run_config)
    before = protected.read_bytes()
    done = run_stage(module, *args, cwd=tmp_path)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "refusing to" in lines[0] and words in lines[0], lines[0]
    assert protected.read_bytes() == before


def test_a_stage_replaces_its_own_earlier_output(char_shards, tiny_run_config, tmp_path):
    """What the refusals above let through: a rerun of the same run into its directory, an evaluation
    over its earlier table and a build over its earlier database and receipt all succeed."""
    run_dir = tmp_path / "run"
    train = ["--run-id", "ok-00000000", "--config-json", json.dumps(tiny_run_config), "--data-dir", str(char_shards),
             "--out-dir", str(run_dir), "--no-progress"]
    evaluate = ["--evaluation", "val", "--run-dir", str(run_dir), "--data-dir", str(char_shards),
                "--out", str(tmp_path / "val.parquet"), "--device", "cpu"]
    build = ["build", "--out", str(tmp_path / "db.duckdb"), "--manifest", str(char_shards / "manifest.json"),
             "--receipt", str(tmp_path / "db.built")]
    stages = (("lipflow.train", train), ("lipflow.evaluation", evaluate), ("lipflow.results", build))
    for module, args in stages:  # the earlier outputs (in this process: the reruns are what is tested)
        set_up_with(module, *args, cwd=tmp_path)
    for module, args in stages:
        done = run_stage(module, *args, cwd=tmp_path)
        assert done.returncode == 0, (module, done.stderr)


def test_query_runs_a_pivot_that_names_its_values(tmp_path):
    db = results_db(tmp_path)
    done = run_stage("lipflow.cli", "query", "PIVOT (SELECT 'x' AS k, 2 AS v) ON k IN ('x', 'y') USING sum(v)",
                     "--db", str(db), "--format", "csv")
    assert done.returncode == 0 and done.stdout.splitlines() == ["x,y", "2,"], done.stderr


def test_connect_is_locked_to_the_database(tmp_path):
    """lipflow.connect() reads the database's tables and views, and no file, extension or setting."""
    import duckdb

    import lipflow

    db = results_db(tmp_path)
    (tmp_path / "secret.csv").write_text("a\n1\n")
    con = lipflow.connect(db)
    assert con.execute("SELECT run_id FROM best").fetchall() == [("a-00000000",)]
    for sql in (f"SELECT * FROM read_csv('{tmp_path}/secret.csv')", f"COPY runs TO '{tmp_path}/out.csv'",
                f"ATTACH '{tmp_path}/new.duckdb'", "SET enable_external_access = true", "INSTALL httpfs",
                f"SET temp_directory = '{tmp_path}/spill'"):
        with pytest.raises(duckdb.Error):
            con.execute(sql)
    # no spill folder either (DuckDB's default is <db>.tmp beside the database)
    assert con.execute("SELECT current_setting('temp_directory')").fetchone() == ("",)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results", "secret.csv"]


def test_cuda_without_a_gpu_is_one_line(char_shards, tiny_run_config, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    run_dir = real_fake_run(tmp_path, char_shards, tiny_run_config)
    evaluate = run_stage("lipflow.evaluation", "--evaluation", "val", "--run-dir", str(run_dir), "--data-dir",
                         str(char_shards), "--out", str(tmp_path / "val.parquet"), "--device", "cuda")
    train = run_stage("lipflow.train", "--run-id", "bad-00000000", "--config-json",
                      json.dumps({**tiny_run_config, "device": "cuda"}), "--data-dir", str(char_shards),
                      "--out-dir", str(tmp_path / "run"), "--no-progress")
    for done in (evaluate, train):
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert done.returncode == 2 and len(lines) == 1, done.stderr
        assert "device: 'cuda' was requested but no CUDA device is available" in lines[0]
    assert not (tmp_path / "val.parquet").exists() and not (tmp_path / "run").exists()


def test_sample_reads_the_tokenizer_of_its_results_dir(char_shards, tiny_run_config, tmp_path):
    """``--results DIR``: the run's data directory (recorded relative to where it was trained) is
    found under DIR's parent, not under the current directory."""
    from lipflow.data.parquet import write_table_parquet

    elsewhere = tmp_path / "project" / "results"
    shutil.copytree(char_shards, elsewhere / "data" / "char")
    run_dir = real_fake_run(tmp_path, char_shards, tiny_run_config)
    info = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**info, "data_dir": "results/data/char"}))
    write_table_parquet(run_dir / "train_metrics.parquet",
                        pa.table({"run_id": ["fake-00000000"], "step": [0], "loss": [1.0]}))
    shutil.move(run_dir, elsewhere / "runs" / "fake-00000000")
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    done = run_stage("lipflow.cli", "sample", "fake-00000000", "--results", str(elsewhere), "--prompt", "The",
                     "--tokens", "5", "--device", "cpu", cwd=cwd)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("The")


def test_disk_full_while_checkpointing_is_one_line(char_shards, tiny_run_config, tmp_path):
    """A full disk (a 1 MiB tmpfs; needs root) stops training with one line naming the file and
    leaves no temp file or final output."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        (disk / "filler").write_bytes(b"\0" * (1024 * 1024 - 64 * 1024))
        done = run_stage("lipflow.train", "--run-id", "bad-00000000", "--config-json",
                         json.dumps({**tiny_run_config, "d_model": 64}), "--data-dir", str(char_shards),
                         "--out-dir", str(disk / "run"), "--no-progress")
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert done.returncode == 2 and len(lines) == 1, done.stderr
        assert "No space left on device" in lines[0] and str(disk / "run") in lines[0]
        assert [p.name for p in (disk / "run").rglob("*") if p.is_file()] == [".train.lock"]  # empty, kept
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_runs_merges_config_files_as_snakemake_does(tmp_path):
    """``lipflow runs --configfile A B``: B overrides A key by key (a nested merge, not a replacement), so the
    ids are those of the one file holding the merged config; a shallow merge would drop run a's lr."""
    (tmp_path / "base.yaml").write_text("runs:\n  a: {lr: 0.1}\n")
    (tmp_path / "overlay.yaml").write_text("runs:\n  a: {steps: 5}\n  b: {}\n")
    (tmp_path / "merged.yaml").write_text("runs:\n  a: {lr: 0.1, steps: 5}\n  b: {}\n")
    (tmp_path / "replaced.yaml").write_text("runs:\n  a: {steps: 5}\n  b: {}\n")
    ids = {name: run_stage("lipflow.cli", "runs", "--configfile", *files, cwd=tmp_path)
           for name, files in {"two": ["base.yaml", "overlay.yaml"], "merged": ["merged.yaml"],
                               "replaced": ["replaced.yaml"]}.items()}
    assert all(done.returncode == 0 for done in ids.values()), [done.stderr for done in ids.values()]
    assert len(ids["two"].stdout.split()) == 2
    assert ids["two"].stdout == ids["merged"].stdout != ids["replaced"].stdout


def test_query_output_cut_short_by_its_reader_is_quiet(tmp_path):
    """``lipflow query … | head -1``: when the reader closes the pipe the command ends with status 141
    (SIGPIPE's), and says nothing on stderr (it printed 'lipflow: error: [Errno 32] Broken pipe')."""
    import subprocess
    import sys

    import duckdb

    db = tmp_path / "big.duckdb"
    with duckdb.connect(str(db)) as con:  # far more output than a pipe buffer holds
        con.execute("CREATE TABLE runs AS SELECT range AS step FROM range(200000)")
    query = subprocess.Popen([sys.executable, "-m", "lipflow.cli", "query", "SELECT * FROM runs", "--db", str(db),
                              "--format", "csv"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    assert query.stdout.readline() == b"step\n"
    query.stdout.close()
    stderr = query.stderr.read().decode()
    assert query.wait(timeout=120) == 141
    assert stderr == ""


def test_a_data_stage_never_replaces_what_it_did_not_write(char_shards, tmp_path):
    """--out-dir on a user's file or on a folder holding a file the stage does not write is refused in one
    line with both untouched (the stage replaced them with its output, exit 0); its own earlier output,
    and what Snakemake leaves of it before a rerun (the declared files deleted), is replaced."""
    corpus_args = ["--config-json", json.dumps({"name": "pydoc", "source": "embedded"}), "--out-dir"]
    mine = tmp_path / "notes.txt"
    mine.write_text("mine")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine too")
    for target in (mine, folder, tmp_path):
        done = run_stage("lipflow.data.corpus", *corpus_args, str(target), cwd=tmp_path)
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert done.returncode == 2 and len(lines) == 1 and "refusing to replace" in lines[0], done.stderr
    assert mine.read_text() == "mine" and (folder / "notes.txt").read_text() == "mine too"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "notes.txt"]  # no temp dirs left

    corpus = tmp_path / "corpus"
    for rerun in range(2):
        done = run_stage("lipflow.data.corpus", *corpus_args, str(corpus))
        assert done.returncode == 0, done.stderr
    for name in ("train.jsonl", "val.jsonl"):  # Snakemake deletes a rule's declared outputs before it reruns
        (corpus / name).unlink()
    assert run_stage("lipflow.data.corpus", *corpus_args, str(corpus)).returncode == 0
    tokens = tmp_path / "char"
    shutil.copytree(char_shards, tokens)
    for name in ("manifest.json", "tokenizer.json"):
        (tokens / name).unlink()
    done = run_stage("lipflow.data.tokenize", "--corpus-dir", str(corpus), "--config-json", json.dumps({"kind": "char"}),
                     "--out-dir", str(tokens))
    assert done.returncode == 0 and (tokens / "manifest.json").is_file(), done.stderr


def test_query_json_is_json_when_a_value_is_not_finite():
    """NaN and ±inf (a diverged run's loss) are the strings "NaN", "±Infinity" in --format json: bare NaN is not JSON,
    and null would read as a missing value."""
    from lipflow.cli import format_rows

    text = format_rows(["loss", "bound"], [(float("nan"), 2.5), (float("-inf"), float("inf"))], "json")
    assert json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in JSON output")) == [
        {"loss": "NaN", "bound": 2.5}, {"loss": "-Infinity", "bound": "Infinity"}]

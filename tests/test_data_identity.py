"""A run follows its data: an edited corpus file reruns the data steps, a file tokenizer is known by
its content, and a checkpoint resumes only on the token shards it was written for."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

from lipflow.config import check_config, tokenizer_id
from lipflow.plan import resolve_runs

from conftest import run_stage, train_here

REPO = Path(__file__).resolve().parent.parent


def paragraphs(line: str, n: int = 400) -> str:
    """A text of ``n`` distinct paragraphs (enough documents for a val split)."""
    return "".join(f"{line} {i}.\n" * 12 + "\n" for i in range(n))


def test_a_file_tokenizer_is_known_by_its_content(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text('{"version": "1.0"}')
    config = {"tokenizer": {"kind": "file", "path": str(path)}, "runs": {"a": {}}}
    check_config(config)
    first_dir, first_runs = tokenizer_id(config["tokenizer"]), list(resolve_runs(copy.deepcopy(config)))
    from lipflow.config.runs import tokenizer_file_sha256

    path.write_text('{"version": "1.1"}')
    tokenizer_file_sha256.cache_clear()  # a new parse (every Snakemake invocation is a new process)
    assert tokenizer_id(config["tokenizer"]) != first_dir
    assert list(resolve_runs(copy.deepcopy(config))) != first_runs


def test_a_data_path_spelled_another_way_is_the_same_data(tmp_path):
    """`./texts//a.txt` and `texts/a.txt` name one file: they gave new run ids, and the built data folder
    refused the config as made from another block. A `..` is kept (`a/../b` is not `b` when `a` is a link)."""
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text('{"version": "1.0"}')

    def resolved(paths: list[str], tokenizer_path: str) -> tuple[list[str], dict]:
        config = {"corpus": {"source": "files", "paths": paths}, "tokenizer": {"kind": "file", "path": tokenizer_path},
                  "runs": {"a": {}}}
        check_config(config)
        return list(resolve_runs(copy.deepcopy(config))), config["corpus"]

    ids, corpus = resolved(["texts/a.txt", "texts/*.md"], str(tokenizer))
    assert corpus["paths"] == ["texts/a.txt", "texts/*.md"]
    spelled = resolved(["./texts//a.txt", "texts/./*.md/"], str(tmp_path) + "//./tokenizer.json")
    assert spelled == (ids, corpus)
    assert resolved(["texts/../texts/a.txt", "texts/*.md"], str(tokenizer))[0] != ids


def test_data_made_from_another_block_is_not_replaced(tmp_path):
    """A corpus block of the same name but other files, or a tokenizer block of the same kind but
    another shard size, would rebuild the folder the earlier runs were trained on: refused before any
    job (snakemake and `lipflow runs` alike), and the folder keeps its bytes; the unchanged config
    still has nothing to do."""
    (tmp_path / "a.txt").write_text(paragraphs("To be, or not to be"))
    (tmp_path / "b.txt").write_text(paragraphs("Now is the winter of our discontent"))
    base = "corpus: {name: mine, source: files, paths: [a.txt]}\nruns: {a: {steps: 2, eval_every: 2}}\n"
    (tmp_path / "config.yaml").write_text(base)
    manifest = tmp_path / "results/data/mine/char/manifest.json"

    def snakemake(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path),
                               "--configfile", str(tmp_path / "config.yaml"), "-c1", *args,
                               str(manifest.relative_to(tmp_path))], capture_output=True, text=True, timeout=300)

    assert snakemake().returncode == 0
    before = manifest.read_bytes()
    for edit, words in ((("[a.txt]", "[b.txt]"), "results/data/mine holds data made from another corpus block "
                         "(corpus.paths was ['a.txt'], is ['b.txt'])"),
                        (("runs:", "tokenizer: {kind: char, shard_tokens: 4096}\nruns:"),
                         "results/data/mine/char holds data made from another tokenizer block "
                         "(tokenizer.shard_tokens was 1048576, is 4096), which runs were trained on: the same "
                         "tokens in other files: set it back to 1048576 to keep them, or move")):
        (tmp_path / "config.yaml").write_text(base.replace(*edit))
        for done in (snakemake("-n"), run_stage("lipflow.cli", "runs", "--configfile", "config.yaml", cwd=tmp_path)):
            assert done.returncode != 0 and words in done.stderr, done.stderr
    assert manifest.read_bytes() == before
    (tmp_path / "config.yaml").write_text(base)
    assert "Nothing to be done" in snakemake("-n").stdout


def test_an_edited_or_added_corpus_file_reruns_the_corpus(tmp_path):
    (tmp_path / "texts").mkdir()
    for i in range(40):  # one document per file
        (tmp_path / "texts" / f"t{i:02d}.txt").write_text(paragraphs(f"Before we proceed any further, {i}", n=2))
    (tmp_path / "config.yaml").write_text("corpus: {name: mini, source: files, paths: ['texts/*.txt']}\n")
    target = "results/data/mini/corpus/corpus.json"

    def snakemake(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path),
                               "--configfile", str(tmp_path / "config.yaml"), "-c1", *args, target],
                              capture_output=True, text=True, timeout=300)

    assert snakemake().returncode == 0
    assert "Nothing to be done" in snakemake("-n").stdout
    with open(tmp_path / "texts" / "t00.txt", "a") as f:
        f.write("All:\nSpeak, speak.\n")
    dry = snakemake("-n")
    assert dry.returncode == 0 and "Updated input files: texts/t00.txt" in dry.stdout, dry.stdout
    assert snakemake().returncode == 0
    (tmp_path / "texts" / "t40.txt").write_text(paragraphs("You are all resolved rather to die than to famish", n=2))
    dry = snakemake("-n")
    reasons = [line for line in dry.stdout.splitlines() if "reason:" in line]
    assert dry.returncode == 0 and any("texts/t40.txt" in line for line in reasons), dry.stdout


def test_a_checkpoint_of_other_data_is_not_resumed(char_shards, tiny_run_config, tmp_path):
    """Shards re-made from another corpus (here with another vocabulary) under the same data dir:
    training starts afresh instead of resuming the old data's model."""
    data = tmp_path / "data"
    out = tmp_path / "run"
    cfg = {**tiny_run_config, "steps": 6, "checkpoint_every": 3}

    def train() -> subprocess.CompletedProcess:
        return run_stage("lipflow.train", "--run-id", "tiny-00000000", "--config-json", json.dumps(cfg),
                         "--data-dir", str(data), "--out-dir", str(out), "--no-progress")

    import shutil

    shutil.copytree(char_shards, data)
    assert train_here(cfg, data, out) == 0  # the old data's run; the command under test is the second train()
    assert sorted(p.name for p in (out / "checkpoints").glob("*.safetensors"))  # kept for a later resume
    for name in ("model.safetensors", "config.json", "train_metrics.parquet", "run.json"):
        (out / name).unlink()  # what Snakemake does before it reruns the job (the train rule's outputs)
    (tmp_path / "other.txt").write_text(paragraphs("zyxw vut"))
    corpus = run_stage("lipflow.data.corpus", "--config-json", json.dumps({"name": "o", "source": "files",
                                                                           "paths": [str(tmp_path / "other.txt")]}),
                       "--out-dir", str(tmp_path / "corpus"))
    assert corpus.returncode == 0, corpus.stderr
    shutil.rmtree(data)
    tok = run_stage("lipflow.data.tokenize", "--corpus-dir", str(tmp_path / "corpus"), "--config-json",
                    json.dumps({"kind": "char"}), "--out-dir", str(data))
    assert tok.returncode == 0, tok.stderr
    again = train()
    assert again.returncode == 0, again.stderr
    assert "resumed from" not in again.stderr and "written for other data" in again.stderr
    from lipflow.train.checkpoint import latest_valid_checkpoint
    from lipflow.atomic import sha256_file

    assert latest_valid_checkpoint(out / "checkpoints")[2]["manifest_sha256"] == sha256_file(data / "manifest.json")
    summary = json.loads((out / "run.json").read_text())
    assert summary["resumed"] is False and summary["vocab_size"] == json.loads((data / "manifest.json").read_text())[
        "vocab_size"]


def test_a_corpus_edit_whose_tokenize_job_failed_is_not_forgotten(tmp_path):
    """Snakemake deletes a job's outputs before running it; when the tokenize job then fails (here refused:
    a user's file in its folder), the runs after it are up to date, so without the data stage's outputs
    among the default targets the next run said "Nothing to be done" with the edit never tokenized and
    no manifest.json. Now the next run tokenizes the edited corpus and retrains on it."""
    corpus = tmp_path / "a.txt"
    corpus.write_text(paragraphs("To be, or not to be", n=60))
    (tmp_path / "config.yaml").write_text(
        "corpus: {name: mine, source: files, paths: [a.txt]}\nevaluations: {enabled: []}\n"
        "runs: {a: {steps: 2, eval_every: 2, checkpoint_every: 0, d_model: 16, n_layers: 1, n_heads: 2, "
        "context: 16, batch_size: 2}}\n")
    tokens = tmp_path / "results/data/mine/char"

    def snakemake(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path),
                               "--configfile", str(tmp_path / "config.yaml"), "-c1", *args],
                              capture_output=True, text=True, timeout=300)

    assert snakemake().returncode == 0, snakemake().stderr
    corpus.write_text(corpus.read_text() + paragraphs("Now is the winter of our discontent", n=5))
    (tokens / "notes.txt").write_text("mine")
    assert snakemake().returncode != 0
    (tokens / "notes.txt").unlink()
    assert "Nothing to be done" not in snakemake("-n").stdout
    assert snakemake().returncode == 0
    from lipflow.atomic import sha256_file
    from lipflow.train.checkpoint import load_weights

    (run_dir,) = (tmp_path / "results/runs").iterdir()
    assert load_weights(run_dir / "model.safetensors")[1]["manifest_sha256"] == sha256_file(tokens / "manifest.json")
    assert json.loads((run_dir / "config.json").read_text())["manifest_sha256"] == sha256_file(tokens / "manifest.json")
    assert "discontent" in (tmp_path / "results/data/mine/corpus/train.jsonl").read_text() + \
        (tmp_path / "results/data/mine/corpus/val.jsonl").read_text()


def test_a_data_file_with_a_brace_in_its_path_is_one_line_before_any_job(tmp_path):
    """Snakemake reads a brace in an input file as a wildcard (doubling it does not escape it there): a corpus
    file named notes{v1}.txt, or such a tokenizer.json, stopped the DAG with a WildcardError naming the rule
    and 'v1' only. Now one line names the key and the file, for snakemake and `lipflow runs` alike."""
    (tmp_path / "notes{v1}.txt").write_text(paragraphs("To be, or not to be"))
    (tmp_path / "tok{2}.json").write_text('{"version": "1.0"}')
    for block, key, name in (("corpus: {name: mine, source: files, paths: ['notes{v1}.txt']}", "corpus.paths",
                              "notes{v1}.txt"),
                             ("tokenizer: {kind: file, path: 'tok{2}.json'}", "tokenizer.path", "tok{2}.json")):
        (tmp_path / "config.yaml").write_text(block + "\n")
        dry = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path),
                              "--configfile", str(tmp_path / "config.yaml"), "-c1", "-n"],
                             capture_output=True, text=True, timeout=300)
        runs = run_stage("lipflow.cli", "runs", "--configfile", "config.yaml", cwd=tmp_path)
        for done in (dry, runs):
            assert done.returncode != 0 and "WildcardError" not in done.stderr, done.stderr
            assert f"config error: {key}: {name} holds a brace, which Snakemake reads as a wildcard" in \
                done.stderr.strip().splitlines()[-1], done.stderr


def test_each_data_folder_keeps_its_own_data_logs(tmp_path):
    """The corpus and tokenize logs were results/logs/{corpus,tokenize}.log, so building a second corpus
    replaced the log of the first, whose folder and runs stay: they follow the data folders now."""
    (tmp_path / "a.txt").write_text(paragraphs("To be, or not to be"))
    (tmp_path / "config.yaml").write_text("corpus: {name: mine, source: files, paths: [a.txt]}\n"
                                          "tokenizer: {kind: bpe, vocab_size: 300}\n")
    dry = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path),
                          "--configfile", str(tmp_path / "config.yaml"), "-c1", "-n",
                          "results/data/mine/bpe300/manifest.json"], capture_output=True, text=True, timeout=300)
    logs = [line.split("log: ")[1] for line in dry.stdout.splitlines() if line.strip().startswith("log:")]
    assert logs == ["results/logs/data/mine/corpus.log", "results/logs/data/mine/bpe300/tokenize.log"], dry.stdout

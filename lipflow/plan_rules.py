"""The Snakemake side of a :class:`~lipflow.plan.Plan`: the input, params and resource functions
the rules call (each takes the job's ``wildcards``), and the file lists of the studies. Kept out of
``common.smk`` so that the rule files hold rules only."""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

from lipflow.plan import IMAGE_MLP, Plan, figure_receipt, recorded_block
from lipflow.studies.digits_split import CLASSES, IMAGE_FEATURES, images_in_test_split
from lipflow.results.views import REPORT_DIR

ICL_TABLES = ["loss_by_layers", "loss_by_n", "preconditioner", "preconditioner_error", "step_sizes", "agreement",
              "training"]
# Every study's tables, by study: what the DuckDB build may load (lipflow.results.database, as <study>_<name>).
STUDY_FILES = {"icl": [f"results/icl/{table}.parquet" for table in ICL_TABLES], "image_mlp": [IMAGE_MLP]}
ICL_FIGURES = [f"results/figures/icl_{name}.{ext}"
               for name in ("loss_vs_layers", "loss_vs_n") for ext in ("png", "svg")]
ICL_FIGURE_RECEIPT = figure_receipt("icl_study")  # not "icl": the icl experiment's figures job has that one
ICL_TABLES_RECEIPT = "results/icl/tables.written"  # the icl_collect job's receipt (lipflow.atomic.write_receipt)
PACKAGE = Path(__file__).resolve().parent


# The code that lays out the results database, its views and its CSV tables (lipflow.results.database
# reads each run's summary fields from lipflow.train.summary): its source is part of the database's receipt,
# and so are the caption files of workflow/report, whose text is each view's comment in the database.
DATABASE_CODE = (PACKAGE / "results", PACKAGE / "experiments", PACKAGE / "train" / "summary.py")


@functools.lru_cache(maxsize=1)
def database_code_digest() -> str:
    """sha256 over the source files of :data:`DATABASE_CODE` and the captions (``*.rst``) of
    :data:`lipflow.results.views.REPORT_DIR` (each file's path within the checkout, as the file system's bytes,
    whatever their encoding, and its bytes, in path order)."""
    files = sorted(path for root in DATABASE_CODE for path in ([root] if root.is_file() else root.rglob("*.py"))
                   if is_source(path))
    digest = hashlib.sha256()
    for path in files + sorted(path for path in REPORT_DIR.glob("*.rst") if is_source(path)):
        source = path.read_bytes()
        digest.update(os.fsencode(path.relative_to(PACKAGE.parent).as_posix()) + f"\0{len(source)}\0".encode() + source)
    return digest.hexdigest()


def is_source(path: Path) -> bool:
    """A regular file that is no hidden one nor in a hidden folder of the checkout: not an editor's lock file
    (Emacs links ``.#views.py`` to a target that does not exist while ``views.py`` is edited), not Jupyter's
    copy in ``.ipynb_checkpoints/``, nor a link."""
    hidden = any(part.startswith(".") for part in path.relative_to(PACKAGE.parent).parts)
    return not hidden and not path.is_symlink() and path.is_file()


def param_count(cfg, vocab):
    """≈ parameters of a GPT-like model: (4 + 2r)·L·d² (blocks: q, k, v, o and an MLP of ratio r) +
    2·V·d (embedding and head); exact for lipschitz_gpt."""
    return (4 + 2 * cfg["mlp_ratio"]) * cfg["n_layers"] * cfg["d_model"] ** 2 + 2 * vocab * cfg["d_model"]


def estimated_vocab_size(tokenizer: dict) -> int:
    """The vocabulary the runs will train with, before the tokenize stage has counted it: a BPE's
    ``vocab_size``, a file tokenizer's own count (its vocabulary and added tokens, and the end-of-text
    token the tokenize stage may add), else (char, or a file that does not load: the tokenize stage names
    its problem) the schema's 512, which the char vocabulary of most corpora stays below. A char
    vocabulary is the train split's characters + 2, known only once the corpus is split and read."""
    if tokenizer["kind"] == "file" and tokenizer["path"]:
        from tokenizers import Tokenizer

        try:
            return Tokenizer.from_file(str(tokenizer["path"])).get_vocab_size(with_added_tokens=True) + 1
        except Exception:  # tokenizers raises a bare Exception on a malformed file
            pass
    return tokenizer["vocab_size"]


class RuleFunctions:
    """The functions the rules name, bound to one Plan."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.resources = plan.config["resources"]

    @functools.cached_property
    def estimated_vocab(self) -> int:
        """:func:`estimated_vocab_size` of the config's tokenizer, read when a train job is first sized (a
        file tokenizer is loaded then, not at every parse: ``--lint``, ``--list-rules``, a study's target)."""
        return estimated_vocab_size(self.plan.config["tokenizer"])

    @property
    def vocab(self) -> int:
        """The vocabulary for the resource estimates: the ``vocab_size`` of the tokenize stage's
        manifest.json once written (Snakemake sizes a job when it is selected to run, after its inputs,
        the manifest among them, exist: so a char run is sized by its real vocabulary), else
        :attr:`estimated_vocab` (a manifest not yet written, or damaged: the train stage names it)."""
        counted = recorded_block(f"{self.plan.tokens_dir}/manifest.json", ()).get("vocab_size")
        return counted if type(counted) is int and counted > 0 else self.estimated_vocab

    # ------------------------------------------------------------------ evaluations

    def evaluation_files(self, run):
        return [f"results/runs/{run}/evals/{evaluation}.parquet" for evaluation in self.plan.run_evaluations(run)]

    def run_evaluation_files(self, wildcards):
        return self.evaluation_files(wildcards.run)

    def run_evaluation_checksums(self, wildcards):
        """The sidecars of run_evaluation_files: each evaluation job's receipt (see rule evaluate)."""
        return [f"{path}.sha256" for path in self.evaluation_files(wildcards.run)]

    def evaluation_receipts(self, wildcards):
        """Every run's evaluation and merged-evaluation sidecars, for `rule all`: Snakemake does not
        look below an up-to-date output for a missing intermediate file, so a receipt deleted by a
        failed evaluation must be asked for by the target itself to be rebuilt."""
        return [f"{path}.sha256" for run in self.plan.runs
                for path in (*self.evaluation_files(run), f"results/runs/{run}/evals.parquet")]

    def evaluation_params_json(self, wildcards):
        return self.plan.evaluation_params_json(wildcards.evaluation)

    # ------------------------------------------------------------------ training

    def run_config_json(self, wildcards):
        return self.plan.run_config_json(wildcards.run)

    def train_mem_mb(self, wildcards, attempt):
        """Per process, 1 GB of runtime + 16 bytes/parameter (weights, grads, two optimizer moments) +
        activations (≈ 34·B·T·d·L floats, Korthikanti et al. 2022); times ``nproc``, doubled on each retry."""
        override = self.resources["train_mem_mb"]
        if override:
            return override * attempt
        cfg = self.plan.run_config(wildcards.run)
        activations = 34 * cfg["batch_size"] * cfg["context"] * cfg["d_model"] * cfg["n_layers"] * 4
        return int(1000 + (16 * param_count(cfg, self.vocab) + activations) / 1e6) * cfg["nproc"] * attempt

    def train_runtime(self, wildcards, attempt):
        """Minutes: 6·N·tokens FLOPs at a conservative 5 GFLOP/s (a CPU core), + 10, doubled on retry."""
        override = self.resources["train_runtime"]
        if override:
            return override * attempt
        cfg = self.plan.run_config(wildcards.run)
        tokens = cfg["steps"] * cfg["batch_size"] * cfg["grad_accum"] * cfg["context"]
        return int(10 + 6 * param_count(cfg, self.vocab) * tokens / 5e9 / 60) * attempt

    def image_mlp_runtime(self, wildcards, attempt):
        """Minutes for the digits-MLP study, as ``train_runtime`` counts them (at 5 GFLOP/s, + 10, doubled on
        retry): per seed and method, 6·N FLOPs per image of its steps and of its PGD's forward and backward
        passes over the test images (``digits_split``: 360), and for each method the worst case of Muon's
        Newton–Schulz, 5 iterations of 3 matmuls (2·m·n·min(m, n) FLOPs each) per matrix and step (MLP 64
        pixels → width → … → 10 classes)."""
        cfg = self.plan.config["image_mlp"]
        widths = [IMAGE_FEATURES] + [cfg["width"]] * (cfg["n_layers"] - 1) + [CLASSES]
        shapes = list(zip(widths[1:], widths[:-1]))
        params = sum(m * n for m, n in shapes)
        attacked = images_in_test_split() * len(cfg["epsilons"]) * cfg["pgd_steps"] * cfg["pgd_restarts"]
        images = cfg["steps"] * cfg["batch_size"] + attacked
        newton_schulz = cfg["steps"] * sum(30 * m * n * min(m, n) for m, n in shapes)
        flops = cfg["seeds"] * len(cfg["methods"]) * (6 * params * images + newton_schulz)
        return int(10 + flops / 5e9 / 60) * attempt

    def train_gpus(self, wildcards):
        """GPUs for one training job: ``gpu_per_run``, at least one per process when GPUs are used."""
        gpus = self.resources["gpu_per_run"]
        return max(gpus, self.plan.run_config(wildcards.run)["nproc"]) if gpus else 0

    def train_cpus(self, wildcards):
        """CPUs (and the rule's ``threads``) for one training job: two per process (the launcher gives each
        worker its share of the job's threads)."""
        return 2 * self.plan.run_config(wildcards.run)["nproc"]

    # ------------------------------------------------------------------ studies and experiments

    def icl_tables(self, wildcards):
        """The ICL study's tables when it is on (the DuckDB build loads them as icl_<table>)."""
        return list(STUDY_FILES["icl"]) if "icl" in self.plan.studies else []

    def study_tables(self, wildcards):
        """Every study table the DuckDB build loads, when its study is on: the ICL tables and the
        digits-MLP robustness table, so that the database waits for them and is rebuilt when they change
        (the database rule also names them on the build's command line: it loads those only)."""
        return [*self.icl_tables(wildcards), *self.plan.study_inputs()]

    def database_receipt(self, database: str) -> str:
        """The database job's receipt, named by a digest of what the build reads (the run folders and the
        study tables its command line names): a database built from another run set (a config changed while
        Snakemake's own records in .snakemake/ were lost, or a results/ shared by two checkouts) then lacks
        this receipt and is rebuilt, where a fixed name would pass it as up to date. The build removes its
        database's other receipts first (:func:`lipflow.results.database.remove_other_receipts`). The digest
        covers the code that lays out the tables and views too (:func:`database_code_digest`): a lipflow whose
        views or tables changed (an upgrade) rebuilds the database, and so the tables and figures drawn from it."""
        inputs = json.dumps([self.plan.database_run_dirs(), self.study_tables(None), database_code_digest()])
        return f"{database}.{hashlib.sha256(inputs.encode()).hexdigest()[:12]}.built"

    def icl_targets(self, wildcards):
        """The ICL study's part of the default target `all`: everything of icl_all when it is on."""
        if "icl" not in self.plan.studies:
            return []
        return [*self.icl_tables(wildcards), ICL_TABLES_RECEIPT, *ICL_FIGURES, ICL_FIGURE_RECEIPT,
                "results/icl/summary.json"]

    def icl_params(self, wildcards):
        return self.plan.icl_params()

    def icl_train_params(self, wildcards):
        return self.plan.icl_train_params()

    def icl_baselines_params(self, wildcards):
        return self.plan.icl_baselines_params()

    def icl_caption(self, wildcards):
        return self.plan.icl_caption()

    def experiment_targets(self, wildcards=None):
        return self.plan.experiment_targets()

    def training_curve_targets(self, wildcards=None):
        return self.plan.training_curve_targets()

    def figure_receipts(self, wildcards=None):
        return self.plan.figure_receipts()

    def study_receipts(self, wildcards=None):
        return self.plan.study_receipts()

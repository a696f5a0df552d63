"""What a run leaves behind, defined once as data: the fields of ``run.json`` and the columns of
``train_metrics.parquet``, each with the Arrow type (an alias for ``pyarrow.type_for_alias``) of
its database column. The trainer writes exactly these; ``lipflow.results`` builds the ``runs`` and
``train_metrics`` tables from them. Imports neither torch nor pyarrow.
"""

from __future__ import annotations

from typing import Any

# a run.json's status: the trainer writes one of these (a diverged run's step and reason beside it)
RUN_STATUSES = ("completed", "diverged")
# run.json fields that open a ``runs`` row (before its name and config columns)
RUN_KEY_FIELDS: dict[str, str] = {"run_id": "string", "status": "string"}
# the other run.json fields, in the order of their ``runs`` columns (after the config columns);
# start/end time are Unix seconds in run.json, timestamps in the database
RUN_SUMMARY_FIELDS: dict[str, str] = {
    "config_hash": "string", "git_commit": "string", "versions": "string", "hostname": "string",
    "device": "string", "processes": "int64", "slurm_job_id": "string", "cuda_visible_devices": "string",
    "start_time": "timestamp[us]", "end_time": "timestamp[us]", "steps_completed": "int64",
    "diverged_step": "int64", "diverged_reason": "string", "resumed": "bool", "n_params": "int64",
    "vocab_size": "int64", "lipschitz_bound": "float64", "max_activation": "float64",
    "final_val_loss": "float64", "final_val_accuracy": "float64",
}

# train_metrics.parquet: every step has run_id … tokens_per_s; eval steps add the rest
METRIC_COLUMNS: dict[str, str] = {
    "run_id": "string", "step": "int64", "loss": "float64", "lr_factor": "float64", "tokens": "int64",
    "grad_norm": "float64", "clipped_updates": "int64", "step_time": "float64", "tokens_per_s": "float64",
    "max_attention_logit": "float64", "attention_logits": "string", "layers": "string",
    "val_loss": "float64", "val_accuracy": "float64", "val_perplexity": "float64",
    "max_activation": "float64", "activations": "string", "lipschitz_bound": "float64", "sharpness": "float64",
    "preconditioned_sharpness": "float64",
}
WALL_CLOCK_COLUMNS = ("step_time", "tokens_per_s")  # measured time: differs between identical runs


def run_summary(**fields: Any) -> dict[str, Any]:
    """The run.json object; ``fields`` must be exactly ``RUN_KEY_FIELDS`` and ``RUN_SUMMARY_FIELDS``."""
    declared = {**RUN_KEY_FIELDS, **RUN_SUMMARY_FIELDS}
    if set(fields) != set(declared):
        raise ValueError(f"run.json fields differ from lipflow.train.summary: missing "
                         f"{sorted(set(declared) - set(fields))}, undeclared {sorted(set(fields) - set(declared))}")
    if fields["status"] not in RUN_STATUSES:
        raise ValueError(f"run.json status {fields['status']!r} is none of {', '.join(RUN_STATUSES)}")
    return {name: fields[name] for name in declared}

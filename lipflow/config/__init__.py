"""Config: the one schema validator (:mod:`lipflow.config.schema`) and the run config's checks,
defaults and ids (:mod:`lipflow.config.runs`). Imports no torch and no experiments (parse time
matters; :mod:`lipflow.plan` joins the config with the experiments)."""

from lipflow.config.runs import (DATA_KEYS_OF_KINDS, FIXED_NS_STEPS, check_config, check_data_blocks, check_run,
                                 data_block, data_block_as_used, data_identity, evaluation_params, experiment_run, mlp_model_keys, plain_runs,
                                 RUN_ID_PATTERN, RUN_KEYS, run_defaults, run_id, check_run_id, run_validator,
                                 SIGMA_MAX_CONSTRAINTS, stage_run, tokenizer_id)
from lipflow.config.schema import SCHEMA_PATH, load_config_file, load_schema, make_validator, validate
from lipflow.errors import ConfigError

__all__ = ["ConfigError", "DATA_KEYS_OF_KINDS", "FIXED_NS_STEPS", "SCHEMA_PATH", "check_config", "check_data_blocks",
           "check_run", "data_block", "data_block_as_used", "data_identity", "evaluation_params", "experiment_run", "load_config_file", "load_schema",
           "make_validator", "mlp_model_keys", "plain_runs", "RUN_ID_PATTERN", "RUN_KEYS", "run_defaults", "run_id",
           "check_run_id", "run_validator", "SIGMA_MAX_CONSTRAINTS",
           "stage_run", "tokenizer_id", "validate"]

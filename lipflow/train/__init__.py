"""The train stage, ``python -m lipflow.train`` (see ``__main__``): one module per job.

- ``trainer``: the loop (``Trainer``), read top to bottom;
- ``build``: output directory, token splits, model, optimizer, constraint, compiled forward;
- ``update``: the constrained update, step → decay → project (shared with the image-MLP study);
- ``checkpoint``: safetensors weights and checkpoints, save/resume with RNG state;
- ``telemetry``: per-step metric rows, eval-step measurements, sharpness, TensorBoard;
- ``stop``: SIGTERM and divergence;
- ``summary``: the fields of run.json and the train-metric columns (imported by the results stage).

Importing this package imports nothing (``lipflow.train.summary`` stays free of torch).
"""

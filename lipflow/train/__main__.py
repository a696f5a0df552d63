"""Train stage: ``python -m lipflow.train --run-id ID --config-json JSON --data-dir D --out-dir O [--no-progress]``.

Trains one run (see ``lipflow.train.trainer``) and prints its summary line; a run stopped by
SIGTERM exits with 143 after saving a checkpoint, and rerunning the command resumes it (once the
run's summary is written, SIGTERM and SIGINT are ignored: the command exits 0). A run of
``nproc`` > 1 checks its inputs, then starts ``nproc`` workers of this command on this machine
(``lipflow.distributed.launch_workers``; ``torchrun --standalone --nproc_per_node=nproc -m
lipflow.train`` starts the same workers), and exits as one process would. One trainer per run folder:
the stage holds a flock on ``<out-dir>/.train.lock``, which its workers inherit (under torchrun, rank 0
takes it).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from lipflow.errors import ArgumentParser, json_object_argument, memory_errors_in_one_line, run_guarded, summary_of


def main(argv: list[str] | None = None, *, exits: bool = False) -> int:
    """The stage; ``exits``: the caller exits with the returned code at once (the command, not a test),
    so a complete run may leave stop signals ignored (:func:`lipflow.train.stop.ignore_stop_signals`)."""
    parser = ArgumentParser(prog="python -m lipflow.train", description=summary_of(__doc__))
    parser.add_argument("--run-id", required=True, help="<run name>-<8 hex digits>")
    parser.add_argument("--config-json", required=True, help="the run's resolved config as JSON")
    parser.add_argument("--data-dir", required=True, type=Path, help="tokenized shards (with manifest.json)")
    parser.add_argument("--out-dir", required=True, type=Path)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    def go() -> int:
        from lipflow.launcher import (LAUNCHER_PID, keep_handed_files_private, processes_in_env,
                                      run_beside_other_workers, terminate_with_launcher)

        processes = processes_in_env()
        if processes is not None:  # a worker: stop with the launcher, asked before importing torch (seconds)
            terminate_with_launcher()
            keep_handed_files_private()
        from lipflow.config import check_run_id, stage_run

        check_run_id(args.run_id, "--run-id")  # both before torch is imported
        cfg = stage_run(json_object_argument(args.config_json, "--config-json"))
        if processes is not None and (LAUNCHER_PID in os.environ or os.environ.get("RANK") != "0"):
            # launch_workers' workers share its lock (torchrun's rank 0 takes it); one stops quietly after another's
            # refusal of an input
            return run_beside_other_workers(lambda: train(cfg, processes))
        from lipflow.train.build import check_run_directory, exclusive_run_folder, missing_folders, remove_if_unused

        # before the lock, whose file a refused folder (a user's) would keep; checked again, with the shards, once held
        check_run_directory(args.out_dir, args.run_id, cfg)
        created, code = missing_folders(args.out_dir), None
        try:
            with exclusive_run_folder(args.out_dir, args.run_id) as lock:
                code = train(cfg, processes, () if lock is None else (lock,))  # workers' failures: a code
            return code
        finally:
            if code != 0 and created:
                remove_if_unused(created)  # a run that failed before writing anything leaves no folder it made

    def train(cfg: dict, processes: int | None, lock: tuple[int, ...] = ()) -> int:
        from lipflow import distributed
        from lipflow.train.build import check_learner, checked_inputs
        from lipflow.train.stop import EXIT_PREEMPTED, Preempted, SecondSignal, ignore_stop_signals
        from lipflow.train.trainer import Trainer

        on_complete = ignore_stop_signals if exits else lambda: None
        if processes is None and cfg["nproc"] > 1:
            # one line, not one per worker
            train_split, _, _ = checked_inputs(args.run_id, cfg, args.data_dir, args.out_dir)
            check_learner(cfg, train_split.vocab_size)
            code = distributed.launch_workers(cfg["nproc"], "lipflow.train",
                                              sys.argv[1:] if argv is None else argv, EXIT_PREEMPTED, lock)
            if code == 0:  # every worker exited after the run was complete
                on_complete()
            return code
        if (processes or 1) != cfg["nproc"]:
            raise ValueError(f"nproc: the run's config says {cfg['nproc']} processes, but this stage runs as one of "
                             f"{processes or 1} (batch_size is per process); run it without torchrun, and it "
                             f"starts nproc workers itself")
        try:
            with memory_errors_in_one_line():
                summary = Trainer(args.run_id, cfg, args.data_dir, args.out_dir, progress=not args.no_progress,
                                  on_complete=on_complete).run()
        except (Preempted, SecondSignal) as stop:
            if getattr(stop, "announce", True):  # a second signal is this process's own
                print(f"lipflow: {stop}", file=sys.stderr)
            return stop.exit_code
        if summary:
            print(json.dumps({k: summary[k] for k in ("run_id", "status", "steps_completed", "final_val_loss",
                                                      "lipschitz_bound")}))
        return 0

    return run_guarded(go)


if __name__ == "__main__":
    sys.exit(main(exits=True))

"""Train stage: ``python -m lipflow.train --run-id ID --config-json JSON --data-dir D --out-dir O``.

Trains one run (see ``lipflow.train.trainer``) and prints its summary line; a run stopped by
SIGTERM exits with 143 after saving a checkpoint, and rerunning the command resumes it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lipflow.errors import ArgumentParser, json_object_argument, run_guarded


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m lipflow.train", description=__doc__.splitlines()[0])
    parser.add_argument("--run-id", required=True, help="<run name>-<8 hex digits>")
    parser.add_argument("--config-json", required=True, help="the run's resolved config as JSON")
    parser.add_argument("--data-dir", required=True, type=Path, help="tokenized shards (with manifest.json)")
    parser.add_argument("--out-dir", required=True, type=Path)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    def go() -> int:
        from lipflow.config import check_run_id, stage_run

        check_run_id(args.run_id, "--run-id")  # both before torch is imported
        cfg = stage_run(json_object_argument(args.config_json, "--config-json"))
        from lipflow.train.stop import EXIT_PREEMPTED, Preempted
        from lipflow.train.trainer import Trainer

        trainer = Trainer(args.run_id, cfg, args.data_dir, args.out_dir, progress=not args.no_progress)
        try:
            summary = trainer.run()
        except Preempted as stop:
            print(f"lipflow: {stop}", file=sys.stderr)
            return EXIT_PREEMPTED
        if summary:
            print(json.dumps({k: summary[k] for k in ("run_id", "status", "steps_completed", "final_val_loss",
                                                      "lipschitz_bound")}))
        return 0

    return run_guarded(go)


if __name__ == "__main__":
    sys.exit(main())

"""Where a result came from: config hash, random streams' seeds, git commit, package versions, host."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("lipflow", "torch", "snakemake", "pyarrow", "duckdb", "tokenizers", "safetensors", "numpy")


def config_hash(cfg: Any) -> str:
    """First 12 hex digits of sha256 over the canonical JSON of ``cfg``."""
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:12]


COMMIT_ENV = "LIPFLOW_GIT_COMMIT"  # the commit of a source tree copied without .git (a GPU machine's), set by hand


def stream_seed(seed: int, *stream: object) -> int:
    """A 63-bit seed for a named random stream, e.g. ``stream_seed(0, "test", 20)``: SHA-256 of the names,
    the same in every process (Python's hash() of a string is not)."""
    digest = hashlib.sha256(":".join(str(s) for s in (seed, *stream)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def git_commit(cwd: Path | None = None) -> str | None:
    """HEAD of the repository lipflow runs from; outside a git checkout ``$LIPFLOW_GIT_COMMIT``, else None."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd or Path(__file__).parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        out = None
    return (out.stdout.strip() if out is not None and out.returncode == 0 else "") or carried_commit()


def carried_commit() -> str | None:
    """``$LIPFLOW_GIT_COMMIT``: the commit a source tree without .git was copied from (None when unset)."""
    return os.environ.get(COMMIT_ENV) or None


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def describe(cfg: Any) -> dict[str, Any]:
    return {"config_hash": config_hash(cfg), "git_commit": git_commit(), "versions": package_versions(),
            "hostname": platform.node()}


def changed_provenance(first: dict[str, Any], now: dict[str, Any]) -> tuple[str, str] | None:
    """What differs between two provenances ({git_commit, versions}), as the earlier's and the later's
    words ("commit a…, torch 2.13.0" and "commit b…, torch 2.14.0"); None when nothing known differs."""
    before, after = [], []
    if None not in (first["git_commit"], now["git_commit"]) and first["git_commit"] != now["git_commit"]:
        before.append(f"commit {first['git_commit']}")
        after.append(f"commit {now['git_commit']}")
    for name, version in first["versions"].items():
        if None not in (version, now["versions"].get(name)) and version != now["versions"][name]:
            before.append(f"{name} {version}")
            after.append(f"{name} {now['versions'][name]}")
    return (", ".join(before), ", ".join(after)) if before else None

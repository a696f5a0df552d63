"""Data stages: corpus → train/val JSONL, tokenizer → Arrow token shards, shards → training windows.

- ``python -m lipflow.data.corpus``   (:mod:`lipflow.data.corpus`)
- ``python -m lipflow.data.tokenize`` (:mod:`lipflow.data.tokenize`)
- :class:`lipflow.data.loader.TokenShards` reads the shards memory-mapped.

This module stays import-light (no torch, no tokenizers) so the stage CLIs start fast; the public
names below are loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from lipflow.errors import DataError


_LAZY = {
    "build_corpus": "lipflow.data.corpus",
    "CorpusConfig": "lipflow.data.corpus",
    "tokenize_corpus": "lipflow.data.tokenize",
    "TokenizerConfig": "lipflow.data.tokenize",
    "TokenShards": "lipflow.data.loader",
    "load_tokenizer": "lipflow.data.loader",
    "read_manifest": "lipflow.data.loader",
}

__all__ = ["DataError", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lipflow.data' has no attribute '{name}'")

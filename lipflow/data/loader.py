"""Memory-mapped reads of the tokenize stage's shards (format in :mod:`lipflow.data.tokenize`).

Each shard is opened with ``pyarrow.memory_map`` and its single ``tokens`` column is viewed as a
numpy array without copying, so only the pages a window touches are ever read. A split is one
token stream (shards concatenated in manifest order, documents separated by the end-of-text id);
windows are taken from that stream and **may cross shard and document boundaries**, as in
GPT-2-style pretraining on packed text.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import torch
from tokenizers import Tokenizer

from lipflow.data import DataError
from lipflow.atomic import sha256_file
from lipflow.errors import parse_json
from lipflow.data.tokenize import check_manifest, vocab_size_of


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(directory) / "manifest.json"
    if not path.is_file():
        raise DataError(f"no token shards at {directory}: {path} not found (run the tokenize stage)")
    try:
        manifest = parse_json(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"corrupt manifest {path}: {e}") from None
    return check_manifest(manifest, path)


def load_tokenizer(directory: str | os.PathLike[str]) -> Tokenizer:
    """The tokenizer a shard directory was encoded with, checked against the manifest's sha256 and
    ``vocab_size`` (the manifest has no checksum: an edit shows only here)."""
    manifest = read_manifest(directory)
    entry = manifest["tokenizer"]
    if not isinstance(entry, dict) or not all(isinstance(entry.get(key), str) for key in ("file", "sha256")):
        raise DataError(f"{Path(directory) / 'manifest.json'}: 'tokenizer' lacks its file or sha256 (truncated or "
                        "edited?)")
    path = Path(directory) / entry["file"]
    if not path.is_file():
        raise DataError(f"tokenizer file not found: {path}")
    if sha256_file(path) != entry["sha256"]:
        raise DataError(f"corrupt tokenizer {path}: sha256 mismatch with manifest.json")
    tokenizer = Tokenizer.from_file(str(path))
    if (vocab := vocab_size_of(tokenizer)) != manifest["vocab_size"]:
        raise DataError(f"{Path(directory)}/manifest.json: vocab_size {manifest['vocab_size']}, but its "
                        f"{manifest['tokenizer']['file']} has {vocab} (edited?)")
    tokenizer.encode_special_tokens = True  # as when the shards were written
    return tokenizer


def _open_shard(path: Path, entry: dict[str, Any], dtype: str, verify: bool) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"missing shard {path}")
    if verify and sha256_file(path) != entry["sha256"]:
        raise DataError(f"corrupt shard {path}: sha256 mismatch (file changed or truncated since manifest.json)")
    try:
        reader = ipc.open_file(pa.memory_map(str(path), "r"))
        if reader.num_record_batches != 1:  # get_batch(0) of none is a bare ValueError
            raise DataError(f"corrupt shard {path}: {reader.num_record_batches} record batches, manifest.json "
                            f"says 1 of {entry['num_tokens']} {dtype} tokens")
        column = reader.get_batch(0).column("tokens")
        tokens = column.to_numpy(zero_copy_only=True)
    except (pa.ArrowException, KeyError) as e:
        raise DataError(f"corrupt shard {path}: not a token shard ({str(e).splitlines()[0]})") from None
    if tokens.dtype != np.dtype(dtype) or len(tokens) != entry["num_tokens"]:
        raise DataError(f"corrupt shard {path}: {len(tokens)} {tokens.dtype} tokens, manifest.json says "
                        f"{entry['num_tokens']} {dtype}")
    return tokens


class TokenShards:
    """One split of a shard directory as a read-only, memory-mapped token stream.

    ``verify`` (default on) hashes every shard on open — one sequential read, no RAM growth — and
    raises ``DataError("corrupt shard …: sha256 mismatch …")`` on any changed or truncated shard, or
    a ``DataError`` when the manifest's ``vocab_size`` is not its tokenizer's.
    """

    def __init__(self, directory: str | os.PathLike[str], split: str, verify: bool = True,
                 max_tokens: int | None = None):
        """``max_tokens`` keeps only the first that many tokens of the split (training on a subset)."""
        self.directory = Path(directory)
        self.max_tokens = max_tokens
        self.split = split
        self.manifest = read_manifest(directory)
        splits = self.manifest["splits"]
        if split not in splits:
            raise DataError(f"{self.directory}/manifest.json has no split '{split}' (has: {', '.join(splits)})")
        entries = splits[split]["shards"]
        self._shards = [
            _open_shard(self.directory / e["file"], e, self.manifest["dtype"], verify) for e in entries
        ]
        self._starts = np.cumsum([0] + [len(s) for s in self._shards])  # stream offset of each shard
        self._tokenizer: Tokenizer | None = load_tokenizer(directory) if verify else None  # checks vocab_size
        for entry, tokens in zip(entries, self._shards if verify else ()):
            if len(tokens) and int(tokens.max()) >= self.vocab_size:  # the embedding lookup would fail mid-run
                raise DataError(f"corrupt shard {self.directory / entry['file']}: token id {int(tokens.max())} is "
                                f"outside the vocabulary of {self.vocab_size} (manifest.json)")

    @property
    def num_tokens(self) -> int:
        total = int(self._starts[-1])
        return total if self.max_tokens is None else min(total, self.max_tokens)

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def eot_id(self) -> int:
        return int(self.manifest["eot_id"])

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Stream tokens [start, stop): a view into one shard, or a copy joined across shards."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"token range [{start}, {stop}) outside the {self.split} split (0, {self.num_tokens})")
        if start == stop:  # an empty range (also at a shard's end or the stream's end, where no shard starts)
            return np.empty(0, np.dtype(self.manifest["dtype"]))
        first = int(np.searchsorted(self._starts, start, side="right")) - 1
        pieces = []
        while start < stop:
            shard, offset = self._shards[first], start - int(self._starts[first])
            take = min(stop - start, len(shard) - offset)
            pieces.append(shard[offset : offset + take])
            start += take
            first += 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def check_context(self, context: int) -> None:
        if context < 1:
            raise DataError(f"context must be a positive integer, got {context}")
        if context + 1 > self.num_tokens:
            cut = f", cut to train_tokens {self.max_tokens}" if self.max_tokens == self.num_tokens else ""
            raise DataError(f"context {context} is longer than the {self.split} split ({self.num_tokens} tokens{cut})")

    def sample_starts(self, batch_size: int, context: int, generator: torch.Generator) -> torch.Tensor:
        """``batch_size`` window starts, uniform on [0, num_tokens − context − 1], drawn from ``generator``."""
        self.check_context(context)
        return torch.randint(0, self.num_tokens - context, (batch_size,), generator=generator)

    def sample_windows(
        self, batch_size: int, context: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random contiguous windows w of context + 1 tokens at ``sample_starts``; returns
        (x, y) = (w[:, :-1], w[:, 1:]) as int64 tensors of shape (batch_size, context)."""
        starts = self.sample_starts(batch_size, context, generator).tolist()
        windows = np.stack([self.tokens(s, s + context + 1) for s in starts]).astype(np.int64)
        w = torch.from_numpy(windows)
        return w[:, :-1], w[:, 1:]

    def resident(self, device: torch.device) -> "ResidentTokens":
        """This split's tokens held in one tensor on ``device`` (see :class:`ResidentTokens`)."""
        return ResidentTokens(self, device)

    def sequential_windows(self, context: int, max_windows: int | None = None) -> torch.Tensor:
        """Windows i = tokens[i·context, i·context + context + 1) for i < (num_tokens − 1) // context
        (capped at ``max_windows``), shape (N, context + 1) int64. Consecutive windows share one
        token, so their targets w[:, 1:] are disjoint and cover the stream once up to its last whole
        window: whole-split eval but for the last (num_tokens − 1) mod context targets."""
        self.check_context(context)
        count = (self.num_tokens - 1) // context
        if max_windows is not None:
            count = min(count, max_windows)
        if count <= 0:  # max_windows 0: no window (a stream of count·context + 1 = 1 token holds none)
            return torch.empty((0, context + 1), dtype=torch.int64)
        body = self.tokens(0, count * context + 1).astype(np.int64)
        windows = np.lib.stride_tricks.sliding_window_view(body, context + 1)[::context]
        # a copy: one window is already contiguous, and ascontiguousarray would hand torch the read-only view
        return torch.from_numpy(windows.copy())

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.directory)
        return self._tokenizer

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of ``ids``, special tokens (the end-of-text separator) included."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)


class ResidentTokens:
    """A split's whole token stream in one int32 tensor on a device; windows are gathered there.

    ``sample_windows`` draws its starts exactly as :meth:`TokenShards.sample_windows` does (the same
    ``torch.randint`` call on the same CPU generator, so the data order, resume and CPU results
    are unchanged), copies the ``batch_size`` starts to the device (pinned, non-blocking on CUDA)
    and gathers the windows there: no host round trip per step and no copy of the batch itself.
    Costs 4 bytes per token of device memory (Tiny Shakespeare: 4 MB).
    """

    def __init__(self, shards: TokenShards, device: torch.device):
        if shards.vocab_size > np.iinfo(np.int32).max:
            raise DataError(f"{shards.directory}: vocabulary of {shards.vocab_size} does not fit int32 token ids")
        self.shards, self.device = shards, device
        stream = torch.from_numpy(shards.tokens(0, shards.num_tokens).astype(np.int32))
        self.tokens = stream.to(device)
        self._offsets: dict[int, torch.Tensor] = {}

    def sample_windows(self, batch_size: int, context: int,
                       generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) int64 of shape (batch_size, context) on the device, as ``TokenShards.sample_windows``."""
        starts = self.shards.sample_starts(batch_size, context, generator)
        if self.device.type == "cuda":
            starts = starts.pin_memory().to(self.device, non_blocking=True)
        else:
            starts = starts.to(self.device)
        if context not in self._offsets:
            self._offsets[context] = torch.arange(context + 1, device=self.device)
        windows = self.tokens[starts[:, None] + self._offsets[context]].long()
        return windows[:, :-1], windows[:, 1:]

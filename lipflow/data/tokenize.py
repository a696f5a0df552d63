"""Tokenize stage: a corpus directory → ``tokenizer.json`` + Arrow IPC token shards + manifest.

    python -m lipflow.data.tokenize --corpus-dir DIR --config-json '{"kind": "bpe", "vocab_size": 512}' --out-dir OUT

Tokenizers (HF ``tokenizers``, registry ``TOKENIZERS``), all fitted on the *train* split only:

- ``char``: one token per Unicode character of the train split. Ids: 0 = ``<|endoftext|>``,
  1 = ``[UNK]``, then the train characters in code-point order; a val character never seen in
  train encodes as ``[UNK]``. Built as a BPE model with that vocabulary, no merges and no
  pre-tokenizer (each character is a symbol that never merges): the same ids as a WordLevel
  model over a FixedLength(1) pre-tokenizer, 3–4× faster in ``tokenizers``.
- ``bpe``: byte-level BPE (GPT-2 pre-tokenization, Radford et al. 2019) trained with
  ``train_from_iterator`` to ``vocab_size`` tokens (256 bytes + ``<|endoftext|>`` + merges;
  fewer if the train split runs out of pairs).
- ``file``: a user-supplied ``tokenizer.json`` (``path``). The end-of-text token is its first
  special token among ``EOT_CANDIDATES``; if it has none, ``<|endoftext|>`` is added. Its
  truncation and padding settings and a BPE model's dropout are dropped, and no template (BOS/CLS…)
  tokens are added.

Output under OUT (built in a temporary sibling, renamed at the end; an existing OUT is replaced only
when it is this stage's earlier output, :func:`not_token_shards`):
``tokenizer.json``; ``{train,val}/shard-00000.arrow`` …, each an Arrow IPC file holding one record
batch with one column ``tokens`` of the smallest unsigned type that holds every id, exactly
``shard_tokens`` long except the last; and ``manifest.json`` (format below). Each split is one
token stream: every document's ids followed by the end-of-text id. Special-token strings inside
documents are encoded as plain text (the separator is inserted by id only); a ``file`` tokenizer
whose model itself encodes a document's text as the separator (a Unigram model with ``</s>`` among
its pieces, on a document holding ``</s>``) is refused, naming the document's line.

Streaming: documents are read in batches of ``batch_docs`` documents or 2²⁰ characters, whichever
comes first, and encoded with ``encode_batch_fast`` (Rust, parallel across cores, GIL released) in
a worker thread while the main thread parses the next batch and writes the previous one, so
memory holds ≤ 3 batches plus one shard buffer whatever the corpus size (one document is
always encoded whole, so the largest document sets the floor). A character-level tokenizer is
applied as a numpy code point → id table instead (``CharTable``: the same ids, checked against
``encode_batch_fast`` on a sample, 10× or more faster).

manifest.json::

    {"format": "lipflow-token-shards/1", "dtype": "uint16", "vocab_size": 512,
     "eot_token": "<|endoftext|>", "eot_id": 0, "shard_tokens": 1048576,
     "tokenizer": {"file": "tokenizer.json", "sha256": "…", "kind": "bpe", "config": {…}},
     "corpus": {"name": "…", "source": {…}, "corpus_json_sha256": "…"},
     "splits": {"train": {"num_docs": 445, "num_tokens": 1234, "bytes": 997327,
                          "shards": [{"file": "train/shard-00000.arrow", "num_tokens": 1234, "sha256": "…"}]},
                "val": {…}}}
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import re
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
from tokenizers import Encoding, Tokenizer, decoders, models, pre_tokenizers, trainers

from lipflow.config.runs import data_block
from lipflow.data import DataError
from lipflow.atomic import atomic_dir, is_clutter, read_json, sha256_file, write_json_atomic
from lipflow.errors import (ArgumentParser, ProgressClock, check_utf8, first_non_utf8, json_object_argument,
                            parse_json, phase_reporter, run_guarded, silent, summary_of)
from lipflow.registry import Registry

EOT = "<|endoftext|>"
UNK = "[UNK]"
EOT_CANDIDATES = (EOT, "<|end_of_text|>", "</s>", "<eos>", "[EOS]", "<|im_end|>", "[SEP]")
SPLITS = ("train", "val")
MANIFEST_FORMAT = "lipflow-token-shards/1"
MANIFEST_KEYS = ("dtype", "vocab_size", "tokenizer", "splits")
SHARD_KEYS = ("file", "num_tokens", "sha256")
TOKEN_DTYPES = ("uint8", "uint16", "uint32")  # token_dtype picks the smallest that holds the ids
BATCH_CHARS = 1 << 20  # per encode batch: tokenizers' Encoding objects take ~80 bytes per token
SHARD_BUFFER = 1 << 20  # tokens a shard buffer starts with; it grows up to shard_tokens as tokens come
OUTPUTS = ("manifest.json", "tokenizer.json", *SPLITS)
SHARD_NAME = re.compile(r"shard-\d{5,}\.arrow")
ARROW_MAGIC = b"ARROW1"
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")  # JSON's only way to a str that UTF-8 cannot encode
BYTE_FALLBACK_TOKENS = tuple(f"<0x{byte:02X}>" for byte in range(256))  # what a BPE's byte_fallback spells with


def check_manifest(manifest: Any, path: Path) -> dict[str, Any]:
    """``manifest`` (read from ``path``) when it has the format above, else a DataError naming the
    file and what it lacks (the manifest has no checksum file: an edit shows only here)."""
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise DataError(f"{path} is not a '{MANIFEST_FORMAT}' manifest")
    missing = [key for key in MANIFEST_KEYS if key not in manifest]
    if missing:
        raise DataError(f"{path} has no '{missing[0]}' (truncated or edited?)")
    if manifest["dtype"] not in TOKEN_DTYPES:  # np.dtype() of another value is a TypeError or another type
        raise DataError(f"{path}: dtype {manifest['dtype']!r} is not one of {', '.join(TOKEN_DTYPES)} (edited?)")
    if not isinstance(manifest["splits"], dict):
        raise DataError(f"{path}: 'splits' is not a mapping of split names")
    for split, info in manifest["splits"].items():
        shards = info.get("shards") if isinstance(info, dict) else None
        if not isinstance(shards, list):
            raise DataError(f"{path}: split '{split}' has no list of shards")
        for index, shard in enumerate(shards):
            if not isinstance(shard, dict) or any(key not in shard for key in SHARD_KEYS):
                raise DataError(f"{path}: shard {index} of split '{split}' lacks one of {', '.join(SHARD_KEYS)}")
            if not isinstance(shard["file"], str):  # a path below the folder: another type is pathlib's TypeError
                raise DataError(f"{path}: shard {index} of split '{split}' has a file name that is not a string "
                                "(edited?)")
    return manifest


def read_corpus_summary(path: Path) -> dict[str, Any]:
    """The corpus stage's corpus.json (``path``) when it holds what tokenizing reads (the name as text,
    the source, each split's byte count), else a DataError naming the file."""
    summary = read_json(path)
    try:
        ok = (isinstance(summary["name"], str) and "source" in summary
              and all(type(summary["splits"][split]["bytes"]) is int for split in SPLITS))
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise DataError(f"{path} lacks the corpus name, source or a split's byte count (truncated or edited? "
                        "rerun the corpus stage)")
    return summary


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    """The ``tokenizer`` config block (``vocab_size`` is used by ``bpe`` only, ``path`` by ``file``);
    its defaults and rules live in the config schema and :func:`lipflow.config.runs.data_block_problem`."""

    kind: str
    vocab_size: int
    path: str | None
    shard_tokens: int
    batch_docs: int

    @classmethod
    def from_dict(cls, block: dict[str, Any]) -> "TokenizerConfig":
        """``block`` validated and filled as the config's own (:func:`lipflow.config.data_block`)."""
        return cls(**data_block("tokenizer", block, DataError))


def iter_texts(jsonl_path: str | os.PathLike[str]) -> Iterator[str]:
    """The documents of a corpus-stage JSONL file, one at a time."""
    with open(jsonl_path, encoding="utf-8") as f:
        try:
            for lineno, line in enumerate(f, 1):
                try:
                    text = parse_json(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    text = None
                # {"text": null}, a list, a number, a lone surrogate ("\ud800", which no tokenizer takes):
                # not what the corpus stage writes
                if not isinstance(text, str) or (SURROGATE_ESCAPE.search(line) and first_non_utf8(text) is not None):
                    raise DataError(f"{jsonl_path}:{lineno}: not a corpus-stage line (rerun the corpus stage)")
                yield text
        except UnicodeDecodeError:  # raised by the file's reads, a chunk ahead of the lines: no line to name
            raise DataError(f"{jsonl_path}: not UTF-8, so not what the corpus stage writes (rerun the corpus "
                            "stage)") from None


def documents_read(texts: Iterable[str], total: int | None, report: Callable[[str], None]) -> Iterator[str]:
    """``texts`` passed through, with a line to ``report`` when :class:`ProgressClock` says so: how many
    documents (of ``total``, the split's count in corpus.json) the fit has read. A BPE fit reads them
    all, then computes its merges (``tokenizers`` draws its own progress bar only on a terminal)."""
    clock = ProgressClock()
    for count, text in enumerate(texts, 1):
        if clock.due():
            report(f"fitting: {documents_of(count, total)} read")
        yield text


def documents_of(count: int, total: int | None) -> str:
    """``count`` documents, and of how many (``total``: a split's count in corpus.json, absent from an
    earlier corpus stage's record)."""
    return f"{count:,} of {total:,} documents" if type(total) is int else f"{count:,} documents"


# A kind is fitted on (or, for ``file``, ignores) the train split's texts, read once.
TOKENIZERS: Registry[Callable[[TokenizerConfig, Iterable[str]], Tokenizer]] = Registry("tokenizer kind")


@TOKENIZERS.register("char")
def char_tokenizer(cfg: TokenizerConfig, texts: Iterable[str]) -> Tokenizer:
    chars: set[str] = set()
    for text in texts:
        chars.update(text)
    vocab = {EOT: 0, UNK: 1, **{c: i for i, c in enumerate(sorted(chars), start=2)}}
    tokenizer = Tokenizer(models.BPE(vocab, [], unk_token=UNK))
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens([EOT, UNK])
    return tokenizer


@TOKENIZERS.register("bpe")
def bpe_tokenizer(cfg: TokenizerConfig, texts: Iterable[str]) -> Tokenizer:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size, special_tokens=[EOT], initial_alphabet=alphabet, show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


@TOKENIZERS.register("file")
def file_tokenizer(cfg: TokenizerConfig, texts: Iterable[str]) -> Tokenizer:
    if not os.path.isfile(cfg.path):
        what = "is not a regular file" if os.path.exists(cfg.path) else "not found"
        raise DataError(f"tokenizer.path: {cfg.path} {what}")
    try:
        tokenizer = Tokenizer.from_file(cfg.path)
    except Exception as e:  # the Rust side raises a bare Exception
        reason = str(e).splitlines()[0]
        raise DataError(f"tokenizer.path: {cfg.path} is not a valid tokenizer.json ({reason})") from None
    problem = unknown_token_problem(tokenizer)
    if problem:
        raise DataError(f"tokenizer.path: {cfg.path} {problem}")
    return tokenizer


def unknown_token_problem(tokenizer: Tokenizer) -> str | None:
    """Why ``tokenizer`` fails on text outside its vocabulary (``tokenizers`` raises, mid-encoding, for
    a WordLevel or WordPiece model whose unknown token is not in its vocabulary and for a Unigram
    model without ``unk_id``; a BPE model without an unknown token in its vocabulary drops such
    characters without a word, unless byte fallback with all 256 ``<0xNN>`` tokens or a byte-level
    pre-tokenizer with all 256 byte symbols in its vocabulary spells them), or None."""
    spec = json.loads(tokenizer.to_str())
    model = spec["model"]
    kind = model.get("type")
    vocab = model.get("vocab", {})
    if (kind == "BPE" and model.get("unk_token") not in vocab
            and not (model.get("byte_fallback") and all(token in vocab for token in BYTE_FALLBACK_TOKENS))
            and not (_is_byte_level(spec.get("pre_tokenizer"))
                     and all(symbol in vocab for symbol in pre_tokenizers.ByteLevel.alphabet()))):
        return ("has a BPE model without an unknown token in its vocabulary, byte fallback with all 256 <0xNN> "
                "byte tokens or a ByteLevel pre-tokenizer with all 256 byte symbols in its vocabulary, so it cannot "
                "encode a character outside its vocabulary (it drops it without a word; set unk_token to a token "
                "of its vocab, or byte_fallback with the byte tokens)")
    if kind in ("WordLevel", "WordPiece") and model.get("unk_token") not in vocab:
        unk = model.get("unk_token")
        return (f"has a {kind} model whose unknown token {unk!r} is not in its vocabulary, so it cannot encode "
                f"a word outside the vocabulary (add {unk!r} to the model's vocab)")
    if kind == "Unigram" and model.get("unk_id") is None:
        return ("has a Unigram model without an unknown token (unk_id is null), so it cannot encode text "
                "outside its vocabulary (set unk_id to an unknown token's id)")
    return None


def _is_byte_level(pre_tokenizer: dict | None) -> bool:
    """Whether a tokenizer.json pre-tokenizer (or one in its Sequence) is ByteLevel: every byte of any
    text becomes one of 256 symbols, which a byte-level BPE has in its vocabulary."""
    if not isinstance(pre_tokenizer, dict):
        return False
    if pre_tokenizer.get("type") == "Sequence":
        return any(_is_byte_level(p) for p in pre_tokenizer.get("pretokenizers", []))
    return pre_tokenizer.get("type") == "ByteLevel"


def unknown_token_id(tokenizer: Tokenizer) -> int | None:
    """The id ``tokenizer`` encodes text outside its vocabulary as: the id of the model's ``unk_token``
    (BPE, WordLevel, WordPiece) or a Unigram model's ``unk_id``; None when it has none."""
    model = json.loads(tokenizer.to_str())["model"]
    if model.get("type") == "Unigram":
        return model.get("unk_id")
    return tokenizer.token_to_id(model["unk_token"]) if model.get("unk_token") else None


def end_of_text(tokenizer: Tokenizer, label: str = "the tokenizer") -> tuple[str, int]:
    """The document separator: the first special token among EOT_CANDIDATES, else a new <|endoftext|>.
    ``tokenizers`` numbers an added token (one it adds, or one of a tokenizer.json's added_tokens) after
    the vocabulary's count, which a vocabulary with a gap in its ids already uses: a DataError naming
    ``label`` when the separator's id is also another token's (that token would read as a separator)."""
    specials = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    token = next((t for t in EOT_CANDIDATES if t in specials), None)
    if token is None:
        token = EOT
        tokenizer.add_special_tokens([EOT])
    eot_id = tokenizer.token_to_id(token)
    clash = sorted(t for t, i in tokenizer.get_vocab(with_added_tokens=True).items() if i == eot_id and t != token)
    if clash:
        raise DataError(f"{label}: its end-of-text token {token!r} gets id {eot_id}, which is also its token "
                        f"{clash[0]!r} (tokenizers numbers an added token after the vocabulary's count, and its ids "
                        "have gaps): number its vocabulary without gaps")
    return token, eot_id


def vocab_size_of(tokenizer: Tokenizer) -> int:
    """1 + the largest id (the embedding table size; equals the token count when ids are dense)."""
    return 1 + max(tokenizer.get_vocab(with_added_tokens=True).values())


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type holding ids 0 … vocab_size − 1."""
    for name in TOKEN_DTYPES:
        if vocab_size - 1 <= np.iinfo(name).max:
            return np.dtype(name)
    raise DataError(f"vocabulary of {vocab_size} tokens does not fit in {TOKEN_DTYPES[-1]}")


class ShardWriter:
    """Cuts one split's token stream into Arrow IPC files of exactly ``shard_tokens`` tokens. The
    buffer starts at ``SHARD_BUFFER`` tokens at most and doubles, up to ``shard_tokens``, as tokens
    come: a shard size far above the corpus (the schema allows 2⁴⁸) costs only the tokens there."""

    def __init__(self, root: Path, split: str, shard_tokens: int, dtype: np.dtype):
        self.root, self.split, self.shard_tokens = root, split, shard_tokens
        self.buffer = np.empty(min(shard_tokens, SHARD_BUFFER), dtype)
        self.fill = 0
        self.shards: list[dict[str, Any]] = []
        (root / split).mkdir()

    def add(self, tokens: np.ndarray) -> None:
        pos = 0
        while pos < len(tokens):
            n = min(len(tokens) - pos, self.shard_tokens - self.fill)
            self._reserve(self.fill + n)
            self.buffer[self.fill : self.fill + n] = tokens[pos : pos + n]
            self.fill += n
            pos += n
            if self.fill == self.shard_tokens:
                self._flush()

    def _reserve(self, size: int) -> None:
        """Grow the buffer to hold ``size`` tokens (≤ shard_tokens), keeping what it holds."""
        if size <= len(self.buffer):
            return
        capacity = min(self.shard_tokens, max(size, 2 * len(self.buffer)))
        try:
            grown = np.empty(capacity, self.buffer.dtype)
        except MemoryError:
            raise DataError(f"tokenizer.shard_tokens: out of memory holding {capacity:,} tokens of one {self.split} "
                            f"shard (shard_tokens is {self.shard_tokens:,}; lower it)") from None
        grown[: self.fill] = self.buffer[: self.fill]
        self.buffer = grown

    def _flush(self) -> None:
        name = f"{self.split}/shard-{len(self.shards):05d}.arrow"
        tokens = self.buffer[: self.fill]
        column = pa.Array.from_buffers(pa.from_numpy_dtype(tokens.dtype), len(tokens), [None, pa.py_buffer(tokens)])
        batch = pa.record_batch([column], names=["tokens"])
        sink = pa.BufferOutputStream()
        with ipc.new_file(sink, batch.schema) as writer:
            writer.write_batch(batch)
        data = sink.getvalue()
        with open(self.root / name, "wb") as f:
            f.write(data)
        self.shards.append({"file": name, "num_tokens": self.fill, "sha256": hashlib.sha256(data).hexdigest()})
        self.fill = 0

    def close(self) -> list[dict[str, Any]]:
        if self.fill:
            self._flush()
        return self.shards


def flat_ids(encodings: Sequence[Encoding], eot_id: int, dtype: np.dtype) -> np.ndarray:
    """Concatenate each document's ids followed by ``eot_id`` into one array."""
    count = sum(map(len, encodings)) + len(encodings)
    eot = (eot_id,)
    parts = (part for encoding in encodings for part in (encoding.ids, eot))
    return np.fromiter(itertools.chain.from_iterable(parts), dtype, count)


def batched(texts: Iterator[str], max_docs: int, max_chars: int = BATCH_CHARS) -> Iterator[list[str]]:
    """Consecutive documents, closing a batch at ``max_docs`` documents or ``max_chars`` characters."""
    batch: list[str] = []
    chars = 0
    for text in texts:
        batch.append(text)
        chars += len(text)
        if len(batch) == max_docs or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


class CharTable:
    """A character-level tokenizer as a code point → id table, applied with numpy.

    A tokenizer whose encoding of a document is exactly "each character's id, [UNK] for a
    character outside the vocabulary" (``char`` above, or such a tokenizer.json) is a lookup:
    ``ids = table[code points]``, with the code points read from the UTF-32 encoding of the batch
    and the end-of-text id inserted at each document's end. That holds for a BPE model with no
    merges, no normalizer or pre-tokenizer, an unknown token without fusing or byte fallback,
    single-character entries only, and special added tokens only (encoded as text here), which
    ``of`` checks; ``encode_stream`` also compares it with ``encode_batch_fast`` on a sample.
    """

    def __init__(self, vocab: dict[str, int], unk_id: int):
        top = max(map(ord, vocab), default=0)
        self.table = np.full(top + 2, unk_id, np.int64)  # the last entry: every code point above top
        self.table[[ord(c) for c in vocab]] = list(vocab.values())

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> "CharTable | None":
        """The table when ``tokenizer`` is a pure character lookup (see the class), else None."""
        spec = json.loads(tokenizer.to_str())
        model = spec["model"]
        if (spec.get("normalizer") or spec.get("pre_tokenizer") or model.get("type") != "BPE"
                or model.get("merges") or model.get("dropout") or model.get("fuse_unk")
                or model.get("byte_fallback") or model.get("continuing_subword_prefix")
                or model.get("end_of_word_suffix") or model.get("unk_token") is None):
            return None
        specials = {t["content"] for t in spec.get("added_tokens", []) if t["special"]}
        if any(not t["special"] for t in spec.get("added_tokens", [])):
            return None
        # special tokens are encoded as text (encode_special_tokens): the model's single-character entries
        # keep their ids, a special one included; only a longer special entry (<|endoftext|>) is no character
        chars = {token: i for token, i in model["vocab"].items() if len(token) == 1 or token not in specials}
        if model["unk_token"] not in model["vocab"] or any(len(token) != 1 for token in chars):
            return None
        return cls(chars, model["vocab"][model["unk_token"]])

    def encode(self, texts: Sequence[str], eot_id: int, dtype: np.dtype) -> np.ndarray:
        """Each document's ids followed by ``eot_id``, as one array (the same as flat_ids)."""
        points = np.frombuffer("".join(texts).encode("utf-32-le"), "<u4")
        ids = self.table[np.minimum(points, len(self.table) - 1)].astype(dtype)
        return np.insert(ids, np.cumsum([len(t) for t in texts]), np.array(eot_id, dtype))


def first_chars(batch: Sequence[str], max_chars: int) -> list[str]:
    """The leading documents of ``batch`` up to about ``max_chars`` characters (at least one)."""
    sample, chars = [], 0
    for text in batch:
        sample.append(text)
        chars += len(text)
        if chars >= max_chars:
            break
    return sample


def encode_batch(tokenizer: Tokenizer, batch: Sequence[str], label: str) -> list[Encoding]:
    """``tokenizer.encode_batch_fast`` without special tokens; an error of the Rust side (a bare
    Exception, e.g. a model that meets a word it has no id for) is a DataError naming ``label``."""
    try:
        return tokenizer.encode_batch_fast(batch, add_special_tokens=False)
    except Exception as e:
        if type(e) is not Exception:  # a Python error is a bug: keep its traceback
            raise
        raise DataError(f"{label} cannot encode a document ({str(e).splitlines()[0]})") from None


def encode_stream(
    tokenizer: Tokenizer, texts: Iterator[str], batch_docs: int, eot_id: int, dtype: np.dtype,
    label: str = "the tokenizer",
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (documents, token array) per batch. A character tokenizer is a numpy lookup
    (CharTable; 10× or more faster than ``encode_batch_fast``), checked against
    ``encode_batch_fast`` on the first 64k characters; any other tokenizer encodes batch k+1 in a
    worker thread while the caller consumes batch k (``encode_batch_fast`` releases the GIL).
    ``label`` names the tokenizer in an encoding error."""
    batches = batched(texts, batch_docs)
    table = CharTable.of(tokenizer)
    if table is not None:
        first = next(batches, None)
        if first is None:
            return
        sample = first_chars(first, 1 << 16)
        expected = flat_ids(encode_batch(tokenizer, sample, label), eot_id, dtype)
        if np.array_equal(table.encode(sample, eot_id, dtype), expected):
            for batch in itertools.chain([first], batches):
                yield len(batch), table.encode(batch, eot_id, dtype)
            return
        print("lipflow: the character table disagrees with the tokenizer on a sample; "
              "encoding with encode_batch_fast instead", file=sys.stderr)
        batches = itertools.chain([first], batches)
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending: tuple[int, Future[list[Encoding]]] | None = None
        for batch in batches:
            future = pool.submit(encode_batch, tokenizer, batch, label)
            if pending is not None:
                yield pending[0], flat_ids(pending[1].result(), eot_id, dtype)
            pending = (len(batch), future)
        if pending is not None:
            yield pending[0], flat_ids(pending[1].result(), eot_id, dtype)


def first_line_encoding(tokenizer: Tokenizer, jsonl_path: Path, start: int, token_id: int) -> int:
    """The line number (``start`` or later) of the first document of a corpus JSONL file whose encoding
    holds ``token_id``; 0 when none does."""
    for lineno, text in enumerate(iter_texts(jsonl_path), 1):
        if lineno >= start and token_id in tokenizer.encode(text, add_special_tokens=False).ids:
            return lineno
    return 0


def shards_text(count: int) -> str:
    return f"{count} shard" + ("s" if count != 1 else "")


def not_token_shards(folder: Path) -> str | None:
    """Why ``folder`` (holding only names the stage writes) is not an earlier output of this stage,
    or None when it is one or what Snakemake leaves of one (it deletes manifest.json and
    tokenizer.json before a rerun, leaving the shard folders): ``train``/``val`` hold Arrow IPC
    files named ``shard-NNNNN.arrow`` only, a manifest.json is a token-shard manifest listing every
    shard there, and a tokenizer.json is the one such a manifest records (by sha256)."""
    entries = {entry.name: entry for entry in folder.iterdir() if not is_clutter(entry.name)}
    for name, entry in entries.items():
        if entry.is_symlink() or not (entry.is_dir() if name in SPLITS else entry.is_file()):
            return f"{name} is not a {'folder' if name in SPLITS else 'regular file'}"
    shards: list[str] = []
    for split in SPLITS:
        for shard in sorted(s for s in entries[split].iterdir() if not is_clutter(s.name)) if split in entries else ():
            if not SHARD_NAME.fullmatch(shard.name) or shard.is_symlink() or not shard.is_file():
                return f"{split}/{shard.name} is not a token shard"
            with open(shard, "rb") as f:
                if f.read(len(ARROW_MAGIC)) != ARROW_MAGIC:
                    return f"{split}/{shard.name} is not an Arrow IPC file"
            shards.append(f"{split}/{shard.name}")
    if "manifest.json" not in entries:
        return "it holds tokenizer.json but no manifest.json" if "tokenizer.json" in entries else None
    path = entries["manifest.json"]
    try:
        manifest = check_manifest(read_json(path), path)
    except (ValueError, DataError):
        return f"its manifest.json is not a '{MANIFEST_FORMAT}' manifest"
    listed = {str(shard["file"]) for info in manifest["splits"].values() for shard in info["shards"]}
    unlisted = [shard for shard in shards if shard not in listed]
    if unlisted:
        return f"its manifest.json does not list {unlisted[0]}"
    recorded = manifest["tokenizer"].get("sha256") if isinstance(manifest["tokenizer"], dict) else None
    if "tokenizer.json" in entries and sha256_file(entries["tokenizer.json"]) != recorded:
        return "its tokenizer.json is not the one its manifest.json records"
    return None


def tokenize_corpus(
    cfg: TokenizerConfig, corpus_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str],
    report: Callable[[str], None] = silent,
) -> dict[str, Any]:
    """Fit the tokenizer on corpus_dir/train.jsonl, shard both splits into ``out_dir``; returns the
    manifest. ``out_dir`` is replaced atomically, or untouched on error (also when a split's JSONL holds
    another number of documents than corpus.json counts: cut short or edited). ``report`` gets a line as
    the tokenizer is fitted (or a file one loaded), as the fit reads documents (:func:`documents_read`)
    and when it is ready, then per split a line when a new shard is written and :class:`ProgressClock`
    says so (shards and tokens written, documents read of the split's count in corpus.json), and one
    when the split is done."""
    check_utf8(str(out_dir), "--out-dir")  # tokenizers writes (and the loader reads) tokenizer.json by a UTF-8 path
    corpus = Path(corpus_dir)
    for name in ("corpus.json", "train.jsonl", "val.jsonl"):
        if not (corpus / name).is_file():
            raise DataError(f"corpus dir {corpus} has no {name} (run the corpus stage first)")
    corpus_summary = read_corpus_summary(corpus / "corpus.json")
    with atomic_dir(out_dir, owned=OUTPUTS, flag="--out-dir", ours=not_token_shards) as tmp:
        report(f"loading the tokenizer {cfg.path}" if cfg.kind == "file"  # fitted on nothing
               else f"fitting the {cfg.kind} tokenizer on train.jsonl")
        train_texts = documents_read(iter_texts(corpus / "train.jsonl"),
                                     corpus_summary["splits"]["train"].get("documents"), report)
        tokenizer = TOKENIZERS.get(cfg.kind)(cfg, train_texts)
        tokenizer.no_truncation()  # a user tokenizer.json may carry these; shards hold whole documents
        tokenizer.no_padding()
        if isinstance(tokenizer.model, models.BPE) and tokenizer.model.dropout:  # BPE-dropout: random merges
            tokenizer.model.dropout = None  # would make every build's shards (and later encodings) differ
        label = f"tokenizer.path: {cfg.path}" if cfg.kind == "file" else f"the {cfg.kind} tokenizer"
        eot_token, eot_id = end_of_text(tokenizer, label)
        vocab_size = vocab_size_of(tokenizer)
        dtype = token_dtype(vocab_size)
        report(f"tokenizer ready: vocab {vocab_size:,}, {dtype.name} tokens")
        tokenizer.save(str(tmp / "tokenizer.json"))
        tokenizer.encode_special_tokens = True  # documents are plain text; separators go in by id
        splits: dict[str, Any] = {}
        for split in SPLITS:
            writer = ShardWriter(tmp, split, cfg.shard_tokens, dtype)
            num_docs, reported, clock = 0, 0, ProgressClock()
            split_docs = corpus_summary["splits"][split].get("documents")
            texts = iter_texts(corpus / f"{split}.jsonl")
            for docs, tokens in encode_stream(tokenizer, texts, cfg.batch_docs, eot_id, dtype, label):
                if np.count_nonzero(tokens == eot_id) != docs:  # the model spelled a document's text as the separator
                    line = first_line_encoding(tokenizer, corpus / f"{split}.jsonl", num_docs + 1, eot_id)
                    raise DataError(f"{label} encodes text of {corpus / split}.jsonl:{line} as its end-of-text token "
                                    f"{eot_token!r} (id {eot_id}), the separator between documents, which its model "
                                    "has in its vocabulary: that document would read as two (give the tokenizer a "
                                    f"special token {EOT!r} that is not in its model's vocabulary, or remove "
                                    f"{eot_token!r} from that vocabulary)")
                num_docs += docs
                writer.add(tokens)
                if len(writer.shards) > reported and clock.due():
                    reported = len(writer.shards)
                    report(f"{split}: {shards_text(reported)}, {reported * cfg.shard_tokens:,} tokens, "
                           f"{documents_of(num_docs, split_docs)}")
            if type(split_docs) is int and num_docs != split_docs:  # cut short at a line end, or edited
                raise DataError(f"{corpus / split}.jsonl holds {num_docs:,} documents, but {corpus / 'corpus.json'} "
                                f"counts {split_docs:,} (truncated or edited? rerun the corpus stage)")
            shards = writer.close()
            num_tokens = sum(s["num_tokens"] for s in shards)
            report(f"{split} done: {shards_text(len(shards))}, {num_docs:,} documents, {num_tokens:,} tokens")
            splits[split] = {
                "num_docs": num_docs,
                "num_tokens": num_tokens,
                "bytes": corpus_summary["splits"][split]["bytes"],
                "shards": shards,
            }
        manifest = {
            "format": MANIFEST_FORMAT,
            "dtype": dtype.name,
            "vocab_size": vocab_size,
            "eot_token": eot_token,
            "eot_id": eot_id,
            "shard_tokens": cfg.shard_tokens,
            "tokenizer": {
                "file": "tokenizer.json",
                "sha256": sha256_file(tmp / "tokenizer.json"),
                "kind": cfg.kind,
                "config": dataclasses.asdict(cfg),
            },
            "corpus": {
                "name": corpus_summary["name"],
                "source": corpus_summary["source"],
                "corpus_json_sha256": sha256_file(corpus / "corpus.json"),
            },
            "splits": splits,
        }
        write_json_atomic(tmp / "manifest.json", manifest)
    return manifest


def main(argv: Sequence[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m lipflow.data.tokenize", description=summary_of(__doc__))
    parser.add_argument("--corpus-dir", required=True, type=Path, help="output of the corpus stage")
    parser.add_argument("--config-json", required=True, help="the 'tokenizer' config block as JSON")
    parser.add_argument("--out-dir", required=True, type=Path, help="output directory (replaced atomically)")
    args = parser.parse_args(argv)
    cfg = TokenizerConfig.from_dict(json_object_argument(args.config_json, "--config-json"))
    try:
        manifest = tokenize_corpus(cfg, args.corpus_dir, args.out_dir, phase_reporter("tokenize"))
    except MemoryError:  # numpy's, or Python's: the output folder is already left as it was
        raise DataError(f"out of memory tokenizing {args.corpus_dir} (lower tokenizer.shard_tokens or "
                        "tokenizer.batch_docs, or give the job more memory)") from None
    counts = " / ".join(f"{manifest['splits'][s]['num_tokens']} {s}" for s in SPLITS)
    vocab = f"vocab {manifest['vocab_size']}, {manifest['dtype']}"
    print(f"tokenizer '{cfg.kind}' ({vocab}): {counts} tokens → {args.out_dir}")


if __name__ == "__main__":
    raise SystemExit(run_guarded(main))

"""The user-facing errors of every stage and :func:`run_guarded`, the one wrapper of every
``python -m lipflow.<stage>`` entry point, with the stages' argument parsing and progress lines
(imports nothing heavy: parse time matters).

Each error's str() is one line naming the field or file; ``run_guarded`` prints it as
``lipflow: error: <line>`` and exits 2. Any other exception is a bug and keeps its traceback, a plain
KeyError too: a key a file or block lacks is refused where it is read, naming the file
(``lipflow.results.inputs.value_of``), so a KeyError left is a lookup the code got wrong.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator


class ConfigError(ValueError):
    """A config (or config block) that does not satisfy its schema or a cross-key rule."""


class DataError(Exception):
    """Bad data input (missing file, bad encoding, corrupt shard…)."""


class IntegrityError(ValueError):
    """A file whose bytes do not match its ``.sha256`` sidecar, or that has none."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used."""


class StageError(RuntimeError):
    """A stage that cannot finish for a reason outside the code (a check of what it wrote failed);
    the message says what, and what was kept."""


class UnknownNameError(KeyError):
    """A registry lookup of a name nobody registered."""

    def __str__(self) -> str:  # KeyError quotes its message by default
        return str(self.args[0])


# OSError: a missing, unreadable or unwritable file, a full disk: one line naming the file. Not KeyError (a
# bug's lookup), but the KeyError a registry raises for a name nobody registered.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, ConfigError, DataError, IntegrityError,
                                                CheckpointError, StageError, UnknownNameError)


def run_guarded(fn: Callable[[], int | None]) -> int:
    """Run a stage (``None`` counts as success); a bad input becomes one line on stderr and exit
    code 2 (traceback with ``LIPFLOW_DEBUG=1``); Ctrl-C is one line and exit code 130 (128 + SIGINT,
    as a shell reports it); anything else is a bug and keeps its traceback."""
    try:
        return fn() or 0
    except KeyboardInterrupt:
        if os.environ.get("LIPFLOW_DEBUG"):
            raise
        print("lipflow: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as err:
        if os.environ.get("LIPFLOW_DEBUG"):
            raise
        print(f"lipflow: error: {err}", file=sys.stderr)
        return 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the stages' error format: a bad or missing option is one line
    ``lipflow: error: <what> (see <prog> --help)`` on stderr and exit code 2, where plain argparse
    prints its usage block and a second line. Subcommands inherit it."""

    def error(self, message: str):
        self.exit(2, f"lipflow: error: {message} (see {self.prog} --help)\n")


# torch's messages for a tensor size beyond its 64-bit sizes (a product of sizes the schema allows one by one)
SIZE_OVERFLOW_MESSAGES = ("Storage size calculation overflowed", "Overflow when unpacking long long")
MODEL_MEMORY_ADVICE = "lower d_model, mlp_ratio, n_layers, batch_size or context"  # for a model or batch too large


def out_of_memory(err: BaseException, advice: str = MODEL_MEMORY_ADVICE) -> StageError | None:
    """A one-line StageError for a model or batch that does not fit in memory (torch raises a
    RuntimeError with the allocator's message) or whose size torch cannot even represent (a
    RuntimeError or TypeError saying the size overflowed), ending in ``advice``; else None."""
    message = str(err)
    if isinstance(err, RuntimeError) and ("can't allocate memory" in message or "out of memory" in message):
        detail = message.split("DefaultCPUAllocator: ")[-1].split(". Error code")[0].splitlines()[0]
    elif isinstance(err, (RuntimeError, TypeError)) and any(m in message for m in SIZE_OVERFLOW_MESSAGES):
        detail = "a tensor's size overflows 64 bits"
    else:
        return None
    return StageError(f"out of memory ({detail}): {advice}")


@contextlib.contextmanager
def memory_errors_in_one_line(advice: str = MODEL_MEMORY_ADVICE) -> Iterator[None]:
    """Inside the block, a failure :func:`out_of_memory` recognises is raised as its one-line StageError
    (ending in ``advice``); every other exception passes unchanged."""
    try:
        yield
    except (RuntimeError, TypeError) as err:
        memory = out_of_memory(err, advice)
        if memory is None:
            raise
        raise memory from None


def summary_of(doc: str) -> str:
    """The first paragraph of a module's docstring on one line: a command's ``--help`` description
    (its first line alone may stop mid-sentence)."""
    return " ".join(doc.strip().split("\n\n")[0].split())


def check_distinct_paths(paths: Iterable[str | os.PathLike[str]], where: str) -> None:
    """A ValueError naming the first of ``paths`` given twice (the same file by any spelling): its rows
    would be counted twice."""
    seen: dict[Path, str | os.PathLike[str]] = {}
    for path in paths:
        key = Path(path).resolve()
        if key in seen:
            raise ValueError(f"{where}: {path} is given twice (as {seen[key]})")
        seen[key] = path


def silent(message: str) -> None:
    """The progress reporter that says nothing: the default ``report`` of a long computation."""


PROGRESS_SECONDS = 10.0  # the least time between two "so far" lines of a long loop (ProgressClock)


class ProgressClock:
    """When a long loop reports how far it is: ``due()`` is True once ``PROGRESS_SECONDS`` have passed
    since the clock started or since it last said True (a line per item would flood a large job's log)."""

    def __init__(self) -> None:
        self.last = time.monotonic()

    def due(self) -> bool:
        now = time.monotonic()
        if now - self.last < PROGRESS_SECONDS:
            return False
        self.last = now
        return True


def phase_reporter(prefix: str) -> Callable[[str], None]:
    """A progress reporter for a stage's log: ``report(message)`` prints ``<prefix>: <message> (<seconds
    since this call> s)`` on stdout, flushed at once (a job's log holds its stdout), :func:`printable`: a
    stdout with strict errors raised on a file name that is not UTF-8, and the stage failed on a progress
    line naming no file."""
    started = time.monotonic()

    def report(message: str) -> None:
        print(printable(f"{prefix}: {message} ({time.monotonic() - started:.1f} s)"), flush=True)

    return report


def printable(text: str) -> str:
    """``text`` with each character UTF-8 cannot encode (a lone surrogate: a file name that is not UTF-8,
    :func:`first_non_utf8`) as its escape, ``\\udcff``: what a strict stdout (a UTF-8 locale) can write."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def first_non_utf8(text: str) -> int | None:
    """The index of ``text``'s first character that UTF-8 cannot encode (a lone surrogate: a JSON escape
    such as ``\\ud800``, or bytes of an argument, environment variable or file name that are not UTF-8,
    which Python passes on as surrogates), None when there is none."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return err.start
    return None


def check_utf8(text: str, where: str) -> None:
    """A ValueError naming ``where`` when ``text`` is not UTF-8 text (:func:`first_non_utf8`), which DuckDB
    (given a path: a bare ``std::bad_cast``) and the tokenizer fail on."""
    if (start := first_non_utf8(text)) is not None:
        raise ValueError(f"{where} is not valid UTF-8 text (at byte {len(text[:start].encode())})")


def count_argument(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer ≥ ``minimum`` (a layer, thread, round or step count), else the
    one-line error ``'x' is not an integer ≥ minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"'{text}' is not an integer ≥ {minimum}")
        return value
    parse.__name__ = f"integer ≥ {minimum}"
    return parse


def parse_json(text: str | bytes) -> Any:
    """``json.loads(text)``, a document nested deeper than Python's recursion limit or with an integer
    longer than its int_max_str_digits being a :class:`json.JSONDecodeError` like any other malformed
    one (json.loads raises RecursionError, which every reader of a user's JSON would pass on as a
    traceback, or a bare ValueError, a line naming no file)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply to read", text if isinstance(text, str) else "", 0) from None
    except ValueError as err:  # an integer literal past Python's int_max_str_digits (4,300 digits)
        if isinstance(err, (json.JSONDecodeError, UnicodeDecodeError)):
            raise
        raise json.JSONDecodeError(f"number too long to read ({str(err).split(':')[0]})",
                                   text if isinstance(text, str) else "", 0) from None


class RepeatedKey(ValueError):
    """A key written twice in one JSON object (json.loads would keep the last value without a word)."""


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` of json.loads: the object as a dict; a repeated key raises :class:`RepeatedKey`."""
    value = dict(pairs)
    if len(value) != len(pairs):
        seen: set[str] = set()
        raise RepeatedKey(next(key for key, _ in pairs if key in seen or seen.add(key)))
    return value


def json_object_argument(text: str, flag: str) -> dict[str, Any]:
    """The JSON object an option such as ``--config-json`` holds; malformed JSON, a key repeated in one
    object or another JSON type is a one-line :class:`ConfigError` naming the option."""
    try:
        value = parse_json(text)
        json.loads(text, object_pairs_hook=unique_keys)  # parse_json read it, so this one parses too
    except json.JSONDecodeError as err:
        raise ConfigError(f"{flag} is not valid JSON: {err}") from None
    except RepeatedKey as err:
        raise ConfigError(f"{flag}: key {err.args[0]!r} appears twice in one JSON object (JSON keeps the last "
                          "value without a word); write it once") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{flag} must be a JSON object, got {type(value).__name__}")
    return value

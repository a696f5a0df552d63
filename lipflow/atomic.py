"""Crash-safe writes: readers see the old file (or directory) or the complete new one, never half.

The recipe (POSIX ``rename(2)`` is atomic within one filesystem): write to a temporary name in
the *same* directory, flush and ``fsync`` the data, ``os.replace`` it onto the final name, then
``fsync`` the directory so the rename itself survives a power cut. A failure part-way removes
the temporary, so nothing half-written is ever left under the final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Collection, Iterator

from lipflow.errors import IntegrityError, parse_json

_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks (memory stays bounded)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    """``<path>.sha256``: the file's hex sha256 and a newline (the new digest and the old while the file
    is replaced, :func:`write_with_sidecar`)."""
    return Path(path).with_name(Path(path).name + ".sha256")


def write_with_sidecar(path: str | os.PathLike[str], data: bytes) -> str:
    """Atomically write ``data`` to ``path`` with its sha256 in the sidecar; returns the digest.

    Over an earlier sidecar, three atomic steps, so a crash at any point leaves a file its sidecar vouches
    for: the sidecar first lists the new digest and the one of the file there (the file is then the old one
    or the new one), the file is replaced, and the sidecar is cut to the new digest; a write that fails
    before its file is in place puts the sidecar back as it was. Without one, the file and then its sidecar
    (a crash between leaves a file without a sidecar, never trusted). The old digest stays valid after a
    crash between the last two steps, until the next write or ``lipflow.results seal``. A file in the
    sidecar's place that is not a checksum (a user's) is refused before anything is written."""
    sidecar = sidecar_path(path)
    refuse_to_replace_sidecar(path)
    digest = hashlib.sha256(data).hexdigest()
    if sidecar.exists():
        previous = sidecar.read_bytes()
        vouched = sidecar_digests(sidecar)
        if len(vouched) > 1:  # an earlier write stopped half-way: vouch for the file that is there, if any
            actual = sha256_file(path) if Path(path).is_file() else None
            vouched = [actual] if actual in vouched else []
        write_bytes_atomic(sidecar, "".join(f"{line}\n" for line in dict.fromkeys([digest, *vouched])).encode())
        try:
            write_bytes_atomic(path, data)
        except BaseException:  # put back unless the file landed (Ctrl-C while its folder was synced)
            if not (Path(path).is_file() and sha256_file(path) == digest):
                write_bytes_atomic(sidecar, previous)
            raise
    else:
        write_bytes_atomic(path, data)
    write_bytes_atomic(sidecar, (digest + "\n").encode())
    return digest


def is_checksum(path: Path) -> bool:
    """Whether ``path`` holds what :func:`write_with_sidecar` writes (:func:`sidecar_digests`)."""
    return bool(sidecar_digests(path))


def sidecar_digests(sidecar: Path) -> list[str]:
    """The digests a sidecar vouches for: one, or two while (or after a crash while) its file is replaced;
    none when it holds anything else or is no regular file (a named pipe is never opened, which would wait for
    a writer). Whitespace around them is no matter (a sidecar checked out through git's autocrlf ends in
    CRLF). FileNotFoundError without one."""
    found = sidecar.stat()
    if not stat.S_ISREG(found.st_mode) or found.st_size > 256:
        return []
    tokens = sidecar.read_bytes().split()
    if 1 <= len(tokens) <= 2 and all(re.fullmatch(rb"[0-9a-f]{64}", token) for token in tokens):
        return [token.decode() for token in tokens]
    return []


def read_verified(path: str | os.PathLike[str]) -> bytes:
    """The bytes of ``path``, checked against its sidecar: a missing sidecar, one that holds no checksum
    (a folder, a named pipe, a user's notes: the file is not called corrupt) or a mismatch is an
    :class:`IntegrityError` naming the file (what was checked is what is returned). The sidecar is read
    before and after the file, and a digest listed by either read vouches for it: one write replacing the
    file meanwhile (:func:`write_with_sidecar`'s three steps) may cut the sidecar to the new digest while
    the old bytes are read, or swap the new bytes in after the first read, which is no corruption."""
    sidecar = sidecar_path(path)
    try:
        listed_before = sidecar_digests(sidecar)
    except OSError:  # none yet, or unreadable: the read after the file decides
        listed_before = []
    data = Path(path).read_bytes()
    try:
        expected = sidecar_digests(sidecar)
    except FileNotFoundError:
        raise IntegrityError(f"{path} has no checksum file {sidecar.name}, so it cannot be verified (rerun the job "
                             "that writes it; for a file from before checksums: python -m lipflow.results seal)"
                             ) from None
    if not expected:
        raise IntegrityError(f"{path} cannot be verified: its checksum file {sidecar.name} holds no sha256 checksum "
                             "(move it away and rerun the job that writes it)")
    if hashlib.sha256(data).hexdigest() not in [*expected, *listed_before]:
        raise IntegrityError(f"{path} is corrupt: sha256 does not match {sidecar.name}")
    return data


def read_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A JSON file's object (every JSON file lipflow writes holds one); a truncated or malformed file,
    or one holding another JSON value, is a ValueError naming it."""
    try:
        value = parse_json(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); truncated or edited?") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, not an object; truncated or edited?")
    return value


def json_object_keys(path: str | os.PathLike[str]) -> set[str] | None:
    """The keys of the JSON object a file holds; None when it is unreadable or holds no JSON object
    (how a command recognises its own receipt or summary before replacing it)."""
    try:
        return set(read_json(path))
    except (OSError, ValueError):
        return None


def refuse_to_replace_receipt(path: str | os.PathLike[str], key: str, command: str) -> None:
    """``--receipt`` may replace an earlier receipt of ``command`` only (a JSON object whose one key is
    ``key``), never a user's other file."""
    refuse_to_replace(path, "--receipt", f"a receipt of {command}", lambda p: json_object_keys(p) == {key})


def write_receipt(path: str | os.PathLike[str], key: str, written: Collection[str | os.PathLike[str]]) -> None:
    """A job's receipt, written last: the files it wrote, under ``key``. A plain Snakemake output beside
    update() ones, deleted before the job, so a failed job (whose update() outputs Snakemake restores,
    newer than their inputs) is rerun instead of its old outputs passing as current."""
    write_json_atomic(path, {key: [str(file) for file in written]})


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Persist a directory's entries (a rename is durable only once its directory is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


HOST = socket.gethostname()


def temp_prefix(final: Path, kind: str = "tmp") -> str:
    """``.<name>.<kind>-<host>-<pid>-``: the prefix of this process's temporary siblings of ``final``."""
    return f".{final.name}.{kind}-{HOST}-{os.getpid()}-"


# What file browsers, notebooks and NFS put into any folder by themselves (Finder's .DS_Store and ._*
# files, Windows' Thumbs.db and desktop.ini, Jupyter's .ipynb_checkpoints, NFS's .nfs* renames of files
# deleted while open): no one's work, so never a reason to refuse a stage's own output folder.
CLUTTER_NAMES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini", ".ipynb_checkpoints"})


def is_clutter(name: str) -> bool:
    """Whether ``name`` is one of the files tools leave in any folder (:data:`CLUTTER_NAMES`)."""
    return name in CLUTTER_NAMES or name.startswith(("._", ".nfs"))


def is_temporary(name: str) -> bool:
    """Whether ``name`` is one of the temporary siblings :func:`atomic_write` and :func:`atomic_dir` make."""
    return name.startswith(".") and (".tmp-" in name or ".old-" in name)


# How a temporary sibling's name begins (temp_prefix): .<final name>.<tmp|old>-<host>-<pid>-
TEMPORARY_NAME = re.compile(r"\.(?P<final>.+)\.(?:tmp|old)-(?P<host>.+)-(?P<pid>\d+)-")


def remove_temporaries(folder: Path, of: Callable[[str], bool]) -> list[str]:
    """Delete every temporary sibling :func:`atomic_write` or :func:`atomic_dir` left in ``folder`` of a
    final name that passes ``of`` (any process's, any host's: for a caller that holds the folder, so no
    other process writes there); other names, a user's, are kept. Returns the names deleted."""
    removed = [entry for entry in sorted(folder.iterdir())
               if (match := TEMPORARY_NAME.match(entry.name)) and of(match["final"])]
    for entry in removed:
        _remove_temporary(entry)
    return [entry.name for entry in removed]


def _remove_temporary(entry: Path) -> None:
    """Delete a temporary file, or the folder :func:`atomic_dir` made, whatever remains of it."""
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            entry.unlink()


def remove_stale_temporaries(final: Path) -> None:
    """Delete the temporary siblings of ``final`` left by a process of this host that is gone (killed
    mid-write: its rename never came); a live process's, or another host's, are left alone."""
    with contextlib.suppress(OSError):
        for entry in final.parent.iterdir():
            match = TEMPORARY_NAME.match(entry.name)
            if match and (match["final"], match["host"]) == (final.name, HOST) and not process_alive(int(match["pid"])):
                _remove_temporary(entry)


def process_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (signal 0 checks without sending)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _umask_mode(mode: int) -> int:
    """``mode`` less the process umask: the permissions ``open``/``mkdir`` would have given
    (``mkstemp``/``mkdtemp`` create private 0600/0700 entries)."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb", **open_kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary sibling of ``path`` for writing; on a clean exit fsync and rename it onto
    ``path``; on an exception delete it and leave ``path`` untouched."""
    final = Path(path)
    if final.is_dir():
        raise IsADirectoryError(f"cannot write {final}: it is a directory")
    remove_stale_temporaries(final)
    try:
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(final), dir=final.parent)
    except OSError as err:  # name the file asked for, not the temporary one
        reason = f"folder {final.parent} does not exist" if isinstance(err, FileNotFoundError) else err.strerror
        raise type(err)(f"cannot write {final}: {reason}") from None
    os.chmod(tmp, _umask_mode(0o666))
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(err, OSError) and err.errno is not None and err.filename is None:  # e.g. a full disk
            raise OSError(err.errno, err.strerror, str(final)) from None
        raise
    fsync_dir(final.parent)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_write(path, "wb") as f:
        f.write(data)


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON (stable bytes for hashing and diffs)."""
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def refuse_to_replace(path: str | os.PathLike[str], flag: str, what: str, is_ours: Callable[[Path], bool]) -> None:
    """A FileExistsError naming ``flag`` and ``path`` when ``path`` exists (or is a link) and is not
    ``what``, the kind of file the stage writes there: its earlier output, which it may replace,
    passes ``is_ours``; a user's other file, a folder or a link is never replaced."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and not (path.is_file() and is_ours(path))):
        raise FileExistsError(f"{flag} {path} exists and is not {what}; refusing to replace it (if it is a "
                              "damaged earlier output, delete it)")


def check_folder_exists(path: str | os.PathLike[str], flag: str) -> None:
    """A FileNotFoundError naming ``flag`` when the folder ``path`` is to be written in does not exist,
    found before a command's work instead of when it writes its result."""
    if not Path(path).parent.is_dir():
        raise FileNotFoundError(f"{flag} {path}: folder {Path(path).parent} does not exist")


def is_sealed(path: Path) -> bool:
    """Whether ``path`` matches its ``.sha256`` sidecar: an intact earlier output of a lipflow stage."""
    try:
        read_verified(path)
    except (IntegrityError, OSError):
        return False
    return True


def refuse_to_replace_unsealed(path: str | os.PathLike[str], flag: str, what: str,
                               is_kind: Callable[[Path], bool]) -> None:
    """``path`` may replace the stage's own earlier output only: a file matching its ``.sha256``
    sidecar (:func:`is_sealed`) that is also ``what``, the kind the stage writes there (``is_kind``,
    e.g. a Parquet table with exactly the stage's columns). Another stage's sealed output (a run's
    weights or metrics) or a user's file is never replaced, nor one in the sidecar's place (refused
    here, before the stage's work, where no file is yet)."""
    refuse_to_replace(path, flag, f"{what} (a file of that kind matching its .sha256)",
                      lambda p: is_sealed(p) and is_kind(p))
    refuse_to_replace_sidecar(path, flag)


def refuse_to_replace_sidecar(path: str | os.PathLike[str], flag: str = "checksum file") -> None:
    """:func:`refuse_to_replace` for the sidecar of ``path``: it may replace a checksum only
    (:func:`is_checksum`), never a user's file, a folder or a link in its place."""
    refuse_to_replace(sidecar_path(path), flag, "a sha256 checksum", is_checksum)


def refuse_foreign(final: Path, owned: Collection[str], flag: str = "",
                   ours: Callable[[Path], str | None] | None = None) -> None:
    """A FileExistsError naming ``flag`` and ``final`` when it exists and is not the stage's earlier
    output: a directory of ``owned`` names only, whose contents pass ``ours`` (which returns why they
    are not the stage's, or None; names alone never prove it: a user's ``train.jsonl`` is no corpus)."""
    if not final.exists() and not final.is_symlink():
        return
    where = f"{flag} {final}" if flag else str(final)
    if final.is_symlink() or not final.is_dir():
        raise FileExistsError(f"{where} exists and is not a directory this stage wrote; refusing to replace it "
                              "(choose another output directory or move it away)")
    foreign = sorted(entry.name for entry in final.iterdir() if entry.name not in owned and not is_clutter(entry.name))
    if foreign:
        raise FileExistsError(f"{where} holds {foreign[0]!r}, which this stage does not write; refusing to replace "
                              "the directory (choose another output directory or move it away)")
    if ours is None:
        return
    try:
        reason = ours(final)
    except OSError as err:
        reason = f"{err.filename or final} cannot be read: {err.strerror}"
    if reason:
        raise FileExistsError(f"{where} is not this stage's earlier output ({reason}); refusing to replace the "
                              "directory (choose another output directory or move it away)")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], owned: Collection[str], *, flag: str = "",
               ours: Callable[[Path], str | None] | None = None) -> Iterator[Path]:
    """Yield an empty temporary sibling directory of ``path``; on a clean exit fsync everything in
    it and swap it in as ``path``; on an exception delete it. An existing ``path`` is replaced only
    when it is a directory holding nothing but names of ``owned`` whose contents ``ours`` recognises
    as the stage's (its earlier output, or what Snakemake left of it); anything else there is a
    user's, and refused (:func:`refuse_foreign`, naming ``flag``) up front and again just before the
    swap (a long build leaves time for the folder to change).

    Two renames (old → trash, new → path) because ``rename(2)`` cannot replace a non-empty
    directory; between them ``path`` is briefly absent, never partial.
    """
    final = Path(path)
    if final.name in ("", ".."):  # '.', 'x/..': the temporary sibling would land inside it, and the swap move the
        # current folder (or one above it) away from under the process and the user's shell
        raise ValueError(f"{flag + ' ' if flag else ''}{final} names a folder as '.' or '..': give a path ending in "
                         "the folder's name (e.g. ../<name>)")
    refuse_foreign(final, owned, flag, ours)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(final)
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(final), dir=final.parent))
    except OSError as e:  # name the directory asked for, not the temporary one
        reason = "a file is in the way" if isinstance(e, FileExistsError) else e.strerror
        raise OSError(f"cannot create {final}: {reason}") from None
    os.chmod(tmp, _umask_mode(0o777))
    try:
        yield tmp
        _fsync_tree(tmp)
        refuse_foreign(final, owned, flag, ours)
        if final.exists():
            trash = Path(tempfile.mkdtemp(prefix=temp_prefix(final, "old"), dir=final.parent))
            os.replace(final, trash / final.name)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)  # what cannot go now (an open NFS file) goes as a stale temporary
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(final.parent)

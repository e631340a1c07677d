"""The run's output folder: what lives in it, and how it is written so that a kill at any moment leaves it usable.

A training run owns one folder (``--output_dir``). Everything written into it goes through this module:

- **Atomic files** (:func:`write_bytes_atomic`, :func:`write_json_atomic`): a fsynced temporary file renamed
  over the target, so a reader sees the old file or the new one, never half of one.
- **Protection** (:func:`prepare_output_dir`): a folder holding another run is refused unless the user asks to
  overwrite or resume; ``--overwrite_output_dir`` only ever removes names this package writes
  (:data:`MANAGED_OUTPUT_NAMES`).
- **Publishing** (:func:`publish_dir`, :func:`recover_output_dir`): a finished pipeline replaces the old one
  file by file with atomic renames under a journal; a crash never leaves a half-written file and the next
  start completes the swap.
- **Leftovers** (:func:`remove_tree_safely`, :func:`clean_stale_temporaries`): deletions go through a hidden
  trash name; ``.tmp-*``/``.trash-*`` leftovers of a killed run are removed at the next start.
- **One writer** (:func:`lock_output_dir`): an exclusive ``flock`` on ``<output_dir>/.run.lock`` held by the
  run's main process for its whole life; a second run is refused naming the live one (pid, host, start time),
  and the kernel drops the lock when its holder dies, however it dies, so a crashed run never leaves it stale.
- **Write errors** (:class:`OutputWriteError`, :func:`writing`): a full disk, a file-size limit, a read-only file
  system or a missing permission become one line naming the path and the cause. Every artefact is written to a
  temporary name first, so a failed write never leaves a truncated file in place.
- **Fault points** (:func:`fault_point`): ``DDPM_EXT_FAULT`` kills the process at a named point, for the
  crash tests.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are not locked there
    fcntl = None

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
RUN_MARKER_NAME = "training_args.json"
PUBLISH_JOURNAL_NAME = ".publish-journal.json"
RUN_LOCK_NAME = ".run.lock"
# Files and folders the training script writes into its output folder; --overwrite_output_dir only ever
# touches these names, never anything else the user keeps there.
MANAGED_OUTPUT_NAMES = (
    "model_index.json",
    "unet",
    "scheduler",
    "README.md",
    "metrics.json",
    "sample_grid.png",
    "ddpm_ext_pipeline.py",
    "loss_curve.png",
    "samples",
    "logs",
    RUN_MARKER_NAME,
    PUBLISH_JOURNAL_NAME,
)
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# Temporaries (files, checkpoints and exports being written) start with TMP_PREFIX, deletions in progress with
# _TRASH_PREFIX: no lookup ever takes them for a checkpoint or a pipeline component.
TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"
# hub.export_pipeline builds "<parent>/.<name>.tmp-*" next to its target.
_STALE_PREFIXES = (TMP_PREFIX, _TRASH_PREFIX, "." + TMP_PREFIX)


def checkpoint_step(path: str) -> Optional[int]:
    """The step of a ``checkpoint-<step>`` folder name, or None for any other name."""
    match = _CHECKPOINT_RE.match(os.path.basename(os.path.normpath(path)))
    return int(match.group(1)) if match else None


# --------------------------------------------------------------------------------------------------
# Fault injection (crash tests)
# --------------------------------------------------------------------------------------------------

FAULT_ENV = "DDPM_EXT_FAULT"
_fault_hits: Dict[str, int] = {}


def fault_point(name: str) -> None:
    """Kill this process with SIGKILL at the n-th time it reaches point ``name``, if asked to.

    ``DDPM_EXT_FAULT="checkpoint_write:3"`` kills the process the third time it passes
    ``fault_point("checkpoint_write")``; several points can be given comma-separated. SIGKILL cannot be caught,
    so no ``finally`` block or atexit handler runs: exactly what a power cut or the OOM killer does. Points in
    the script: ``step`` (mid optimizer step, after backward), ``checkpoint_write`` (some checkpoint files
    written, no manifest yet), ``checkpoint_rename`` (complete temporary checkpoint, not yet renamed),
    ``sample`` (generating a sample grid), ``publish`` (after each file moved into the output folder).
    Unset (the normal case), this is one dictionary lookup.
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    for item in spec.split(","):
        point, _, count = item.strip().partition(":")
        if point != name:
            continue
        _fault_hits[name] = _fault_hits.get(name, 0) + 1
        if _fault_hits[name] == int(count or 1):
            logger.warning("%s=%s: killing process %d at %s", FAULT_ENV, spec, os.getpid(), name)
            os.kill(os.getpid(), signal.SIGKILL)
        return


# --------------------------------------------------------------------------------------------------
# Small file-system helpers
# --------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------
# Write errors
# --------------------------------------------------------------------------------------------------


class OutputWriteError(OSError):
    """Writing ``path`` failed: disk full, file too large, read-only file system, no permission, I/O error.

    ``str()`` is one line, e.g. ``no space left on device while writing out/checkpoint-6/model.safetensors``;
    ``errno`` is the cause's. Raised by :func:`writing`.
    """

    def __init__(self, path: str, cause: BaseException):
        code = _os_error_code(cause)
        super().__init__(code, os.strerror(code) if code else str(cause))
        self.path = path
        self.reason = os.strerror(code).lower() if code else f"{type(cause).__name__}: {cause}"

    def __str__(self) -> str:
        return f"{self.reason} while writing {self.path}"


def _os_error_code(exc: BaseException) -> Optional[int]:
    """The errno of an OSError, or of a library error that only carries it in its text (safetensors' Rust I/O
    errors say "... (os error 28)")."""
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    match = re.search(r"os error (\d+)", str(exc))
    return int(match.group(1)) if match else None


@contextlib.contextmanager
def writing(path: str) -> Iterator[None]:
    """Turn an OS-level failure inside the block into :class:`OutputWriteError` naming ``path``.

    Catches ``OSError`` and errors of writers that wrap one (safetensors); any other error passes unchanged.
    """
    try:
        yield
    except (OutputWriteError, OutputDirBusyError):
        raise
    except Exception as exc:
        if not isinstance(exc, OSError) and _os_error_code(exc) is None:
            raise
        raise OutputWriteError(path, exc) from exc


def file_mode() -> int:
    """The mode a new file gets from ``open()`` under the current umask (0o644 under the usual 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def apply_umask(folder: str) -> None:
    """Give every file under ``folder`` the usual mode (:func:`file_mode`) and every folder 0o777 under the umask.

    Writers that go through a private temporary file (``tempfile.mkstemp``, safetensors' ``save_file``) leave
    mode 0600, so another user could read a pipeline's config but not its weights.
    """
    files = file_mode()
    folders = files | ((files & 0o444) >> 2)  # x wherever r
    for root, dirs, names in os.walk(folder):
        os.chmod(root, folders)
        for name in names:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, files)


def fsync_dir(path: str) -> None:
    """fsync a directory so a rename or a new entry inside it survives a power cut (no-op on Windows)."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str) -> None:
    """fsync every file and directory under ``path`` (files first, then their folders)."""
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(root)


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a fsynced temporary file and an atomic rename.

    The file gets the usual permissions (:func:`file_mode`). A failure (full disk, read-only folder, ...) raises
    :class:`OutputWriteError` naming ``path`` and leaves the previous file, if any, untouched.
    """
    folder = os.path.dirname(os.path.abspath(path))
    with writing(path):
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=folder)
        try:
            os.chmod(tmp, file_mode())  # mkstemp creates 0600
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        fsync_dir(folder)


def write_new_file(path: str, data: bytes, shown_path: Optional[str] = None) -> None:
    """Create ``path`` (which must not exist) holding ``data``, fsynced, with the usual permissions.

    For files inside a temporary folder that is renamed into place as a whole (a checkpoint); failures raise
    :class:`OutputWriteError` naming ``shown_path`` (default ``path``).
    """
    with writing(shown_path or path):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_image_atomic(path: str, image) -> None:
    """Save a PIL image as PNG to ``path`` atomically (:func:`write_bytes_atomic`)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    write_bytes_atomic(path, buffer.getvalue())


def write_json_atomic(path: str, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically (see :func:`write_bytes_atomic`).

    Strict JSON has no NaN or ±inf: such a float (a diverged loss or bits/dim in ``metrics.json``) is written as
    ``null``, with a warning naming where it was, so a run never fails after training for one; ``obj`` is not changed.
    """
    replaced: List[str] = []
    finite = _nonfinite_to_null(obj, "", replaced)
    if replaced:
        logger.warning("%s: non-finite values written as null: %s", path, ", ".join(replaced))
    write_bytes_atomic(path, (json.dumps(finite, indent=2, sort_keys=True, allow_nan=False) + "\n").encode())


def _nonfinite_to_null(obj: Any, where: str, replaced: List[str]) -> Any:
    """A copy of a JSON-able ``obj`` with every NaN/±inf float as None; their places are appended to ``replaced``."""
    if isinstance(obj, float) and not math.isfinite(obj):
        replaced.append(f"{where or '(top level)'} = {obj!r}")
        return None
    if isinstance(obj, dict):
        return {k: _nonfinite_to_null(v, f"{where}.{k}" if where else str(k), replaced) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nonfinite_to_null(v, f"{where}[{i}]", replaced) for i, v in enumerate(obj)]
    return obj


def sha256_file(path: str) -> str:
    """SHA-256 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def remove_tree_safely(path: str) -> None:
    """Rename ``path`` to a hidden trash name first, then delete it.

    A process killed half-way through deleting leaves a ``.trash-*`` folder that no lookup ever
    mistakes for a checkpoint or a pipeline component; :func:`clean_stale_temporaries` removes it.
    """
    if not os.path.exists(path):
        return
    parent, name = os.path.split(os.path.abspath(path))
    trash = os.path.join(parent, f"{_TRASH_PREFIX}{name}-{os.getpid()}-{time.time_ns()}")
    os.rename(path, trash)
    fsync_dir(parent)
    if os.path.isdir(trash):
        shutil.rmtree(trash, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(trash)


def clean_stale_temporaries(folder: str) -> List[str]:
    """Delete ``.tmp-*`` and ``.trash-*`` leftovers of a killed run in ``folder``; returns their names."""
    removed = []
    if not os.path.isdir(folder):
        return removed
    for name in sorted(os.listdir(folder)):
        if name.startswith(_STALE_PREFIXES):
            path = os.path.join(folder, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            removed.append(name)
    return removed


# --------------------------------------------------------------------------------------------------
# One writer per output folder
# --------------------------------------------------------------------------------------------------


class OutputDirBusyError(FileExistsError):
    """Another live run holds the output folder's lock; ``holder`` is what it wrote into the lock file."""

    def __init__(self, message: str, holder: Dict[str, Any]):
        super().__init__(message)
        self.holder = holder

    def __str__(self) -> str:
        return self.args[0]


# Locks this process holds: realpath of the folder -> [file descriptor, number of RunLock handles].
_held_locks: Dict[str, list] = {}


class RunLock:
    """A handle on the lock of one output folder (see :func:`lock_output_dir`); ``release()`` or ``with``."""

    def __init__(self, output_dir: str, key: str):
        self.output_dir, self.path, self._key, self._released = output_dir, os.path.join(output_dir,
                                                                                         RUN_LOCK_NAME), key, False

    def release(self) -> None:
        """Give this handle back; the last handle of the process deletes the lock file and unlocks it."""
        if self._released:
            return
        self._released = True
        entry = _held_locks.get(self._key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del _held_locks[self._key]
            with contextlib.suppress(OSError):  # unlinked before unlocking: see lock_output_dir's retry
                os.unlink(self.path)
            os.close(entry[0])

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def lock_output_dir(output_dir: str) -> RunLock:
    """Take the exclusive lock of ``output_dir`` (created if missing) for this process, or refuse.

    The lock is ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``<output_dir>/.run.lock``, which records the holder's pid,
    host, start time and command. The kernel releases it when the holder's descriptor closes, also when the
    process is killed with SIGKILL, so a crashed run never leaves a stale lock (a leftover lock file is
    harmless: the lock, not the file, is what counts). ``flock`` works on local file systems (ext4, xfs, btrfs,
    tmpfs, overlayfs) and on NFS v4 (where Linux emulates it with byte-range locks). Calls from a process that
    already holds the lock succeed (the trainer takes it again inside a script run); without ``fcntl``
    (Windows) nothing is locked.

    Raises:
        OutputDirBusyError: another process holds it; the message names that run and what to do.
        OutputWriteError: the lock file cannot be created (read-only folder, full disk, no permission).
    """
    key = os.path.realpath(output_dir)
    if key in _held_locks:
        _held_locks[key][1] += 1
        return RunLock(output_dir, key)
    path = os.path.join(output_dir, RUN_LOCK_NAME)
    with writing(path):
        os.makedirs(output_dir, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            if fcntl is None:
                break
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_lock_holder(fd)
                os.close(fd)
                raise OutputDirBusyError(_busy_message(output_dir, holder), holder) from None
            except BaseException:
                os.close(fd)
                raise
            # The previous holder deletes the file before unlocking it: if that happened between our open and our
            # flock, we locked a deleted file and must try again with the new one.
            try:
                if os.path.samestat(os.fstat(fd), os.stat(path)):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        try:
            holder = {"pid": os.getpid(), "host": socket.gethostname(),
                      "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "command": " ".join(sys.argv)[:300]}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
            os.fsync(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(path)
            os.close(fd)
            raise
    _held_locks[key] = [fd, 1]
    return RunLock(output_dir, key)


def _read_lock_holder(fd: int) -> Dict[str, Any]:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def _busy_message(output_dir: str, holder: Dict[str, Any]) -> str:
    pid, host = holder.get("pid", "?"), holder.get("host", "an unknown host")
    where = "this machine" if host == socket.gethostname() else f"host {host}"
    started = holder.get("started", "at an unknown time")
    command = f": {holder['command']}" if holder.get("command") else ""
    return (f"--output_dir {output_dir!r} is in use by another training run (pid {pid} on {where}, started "
            f"{started}{command}); two runs writing one folder would mix their checkpoints and pipelines. Wait "
            f"for it to end, stop it (`kill -TERM {pid}` saves a checkpoint first; --resume_from_checkpoint latest "
            f"continues it), or choose another --output_dir.")


# --------------------------------------------------------------------------------------------------
# Output folder protection and atomic publishing
# --------------------------------------------------------------------------------------------------


def prepare_output_dir(output_dir: str, overwrite: bool = False, resuming: bool = False) -> None:
    """Make sure ``output_dir`` may be written by this run; call it on the main process before training.

    - missing or empty: created;
    - non-empty and neither ``overwrite`` nor ``resuming``: refused (the user's files are never touched);
    - ``overwrite``: the previous run's checkpoints, logs and sample folders are removed now (they would
      mix with the new run's); its exported pipeline stays until the new one replaces it atomically at
      the end, so a crash of the new run never leaves the folder without a complete pipeline. Files
      the script did not write are left alone.
    - ``resuming``: left as is apart from stale temporaries and an interrupted publish, which is completed.

    Raises:
        FileExistsError: when the folder holds files and neither flag was given.
    """
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise FileExistsError(f"--output_dir {output_dir!r} exists and is not a folder")
    os.makedirs(output_dir, exist_ok=True)
    recover_output_dir(output_dir)
    clean_stale_temporaries(output_dir)
    entries = [name for name in os.listdir(output_dir) if not name.startswith(".")]
    if not entries or resuming:
        return
    if not overwrite:
        shown = ", ".join(sorted(entries)[:6]) + (", ..." if len(entries) > 6 else "")
        raise FileExistsError(
            f"--output_dir {output_dir!r} is not empty ({shown}); it may hold another run. Pass "
            f"--overwrite_output_dir to replace that run's outputs, --resume_from_checkpoint latest to continue "
            f"it, or choose another --output_dir."
        )
    for name in entries:
        if checkpoint_step(name) is not None or name in ("logs", "samples"):
            remove_tree_safely(os.path.join(output_dir, name))
    unknown = [name for name in entries if name not in MANAGED_OUTPUT_NAMES and checkpoint_step(name) is None]
    if unknown:
        logger.warning("--overwrite_output_dir: keeping files this script did not write: %s", ", ".join(unknown))


def publish_dir(src: str, dst: str, remove: Sequence[str] = ()) -> List[str]:
    """Move every file of the complete folder ``src`` into ``dst``, each with an atomic rename.

    A journal naming ``src`` is written first and deleted last; if the process dies in between,
    :func:`recover_output_dir` (run at the next start) finishes the move. At every moment each file
    in ``dst`` is a complete file, old or new. ``src`` must be on the same file system as ``dst``
    (make it inside ``dst``).

    Args:
        src: a finished, fsynced folder (e.g. an exported pipeline).
        dst: the folder to update.
        remove: relative paths in ``dst`` to delete after the move (files of the old export that the
            new one does not have).

    Returns:
        The relative paths of the published files.
    """
    src, dst = os.path.abspath(src), os.path.abspath(dst)
    files = sorted(
        os.path.relpath(os.path.join(root, name), src) for root, _, names in os.walk(src) for name in names
    )
    journal = os.path.join(dst, PUBLISH_JOURNAL_NAME)
    write_json_atomic(journal, {"src": os.path.basename(src), "files": files, "remove": list(remove)})
    _finish_publish(src, dst, files, remove)
    return files


def _finish_publish(src: str, dst: str, files: Sequence[str], remove: Sequence[str]) -> None:
    touched = set()
    for rel in files:
        source = os.path.join(src, rel)
        if not os.path.exists(source):  # already moved before a crash
            continue
        target = os.path.join(dst, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.replace(source, target)
        touched.add(os.path.dirname(target))
        fault_point("publish")
    for rel in remove:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(dst, rel))
    for folder in sorted(touched | {dst}):
        fsync_dir(folder)
    shutil.rmtree(src, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(dst, PUBLISH_JOURNAL_NAME))
    fsync_dir(dst)


def recover_output_dir(output_dir: str) -> bool:
    """Finish a :func:`publish_dir` that a crash interrupted; returns True if there was one."""
    journal = os.path.join(output_dir, PUBLISH_JOURNAL_NAME)
    if not os.path.isfile(journal):
        return False
    try:
        with open(journal) as f:
            entry = json.load(f)
        src = os.path.join(output_dir, entry["src"])
        files, remove = list(entry["files"]), list(entry.get("remove", []))
    except (OSError, ValueError, KeyError, TypeError):
        # The journal itself is written atomically, so this only happens if someone edited it.
        logger.warning("ignoring unreadable publish journal %s", journal)
        os.unlink(journal)
        return False
    logger.warning("completing an interrupted export into %s", output_dir)
    _finish_publish(os.path.abspath(src), os.path.abspath(output_dir), files, remove)
    return True


def files_under(folder: str) -> List[str]:
    """Sorted relative paths of every file under ``folder``."""
    return sorted(
        os.path.relpath(os.path.join(root, name), folder) for root, _, names in os.walk(folder) for name in names
    )



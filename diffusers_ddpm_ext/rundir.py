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
- **Fault points** (:func:`fault_point`): ``DDPM_EXT_FAULT`` kills the process at a named point, for the
  crash tests.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
RUN_MARKER_NAME = "training_args.json"
PUBLISH_JOURNAL_NAME = ".publish-journal.json"
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
    """Write ``data`` to ``path`` through a fsynced temporary file and an atomic rename."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=folder)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
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


def write_json_atomic(path: str, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically (see :func:`write_bytes_atomic`)."""
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n").encode())


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



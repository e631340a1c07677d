"""The run's output folder (diffusers_ddpm_ext.rundir): protection, atomic files, the publish journal."""

import json
import os

import pytest

from diffusers_ddpm_ext import rundir


def test_prepare_output_dir_protects_user_files(tmp_path):
    out = tmp_path / "run"
    rundir.prepare_output_dir(str(out))  # created
    rundir.prepare_output_dir(str(out))  # empty: fine
    (out / "notes.txt").write_text("mine")
    (out / "model_index.json").write_text("{}")
    os.makedirs(out / "checkpoint-4")
    os.makedirs(out / "logs")
    with pytest.raises(FileExistsError, match="--overwrite_output_dir.*--resume_from_checkpoint"):
        rundir.prepare_output_dir(str(out))
    rundir.prepare_output_dir(str(out), resuming=True)
    assert (out / "checkpoint-4").is_dir()
    rundir.prepare_output_dir(str(out), overwrite=True)
    # Old checkpoints/logs are gone; the user's file and the old pipeline stay until replaced.
    assert sorted(os.listdir(out)) == ["model_index.json", "notes.txt"]
    with pytest.raises(FileExistsError, match="not a folder"):
        rundir.prepare_output_dir(str(out / "notes.txt"))


def test_publish_dir_and_recovery_after_a_crash(tmp_path):
    out = tmp_path / "out"
    (out / "unet").mkdir(parents=True)
    (out / "unet" / "weights").write_text("old")
    (out / "unet" / "stale.bin").write_text("old")
    (out / "keep.txt").write_text("user")
    src = out / ".tmp-export-1"
    (src / "unet").mkdir(parents=True)
    (src / "unet" / "weights").write_text("new")
    (src / "model_index.json").write_text("new")
    files = rundir.publish_dir(str(src), str(out), remove=["unet/stale.bin"])
    assert files == ["model_index.json", "unet/weights"]
    assert (out / "unet" / "weights").read_text() == "new" and not (out / "unet" / "stale.bin").exists()
    assert sorted(os.listdir(out)) == ["keep.txt", "model_index.json", "unet"]

    # Crash after the journal and one move: the next start finishes the job.
    src = out / ".tmp-export-2"
    (src / "unet").mkdir(parents=True)
    (src / "unet" / "weights").write_text("newer")
    (src / "model_index.json").write_text("newer")
    rundir.write_json_atomic(str(out / rundir.PUBLISH_JOURNAL_NAME),
                         {"src": src.name, "files": ["model_index.json", "unet/weights"], "remove": []})
    os.replace(src / "model_index.json", out / "model_index.json")
    assert (out / "unet" / "weights").read_text() == "new"  # half-published state
    rundir.prepare_output_dir(str(out), resuming=True)
    assert (out / "unet" / "weights").read_text() == "newer" and (out / "model_index.json").read_text() == "newer"
    assert sorted(os.listdir(out)) == ["keep.txt", "model_index.json", "unet"]


def test_write_json_atomic_replaces_the_file_in_strict_json(tmp_path):
    """NaN/inf are written as null (issue 24 item 9: a finished run's metrics.json is never lost to a NaN figure;
    see test_train_script.test_non_finite_metrics_are_written_as_null_in_strict_json); the old file is replaced
    whole, no temporary is left, and the file gets the usual permissions."""
    path = tmp_path / "metrics.json"
    rundir.write_json_atomic(str(path), {"a": 1})
    rundir.write_json_atomic(str(path), {"a": float("nan"), "b": 2})
    assert json.loads(path.read_text()) == {"a": None, "b": 2}
    assert os.listdir(tmp_path) == ["metrics.json"]
    assert oct(path.stat().st_mode & 0o777) != oct(0o600)



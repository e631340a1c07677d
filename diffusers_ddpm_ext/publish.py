"""Publishing a trained pipeline: into the run's output folder, and optionally to the Hugging Face Hub.

The local folder is a plain ``save_pretrained`` folder (``model_index.json`` names ``diffusers_ddpm_ext.*``, so
``DiffusionPipeline.from_pretrained`` loads it after ``import diffusers_ddpm_ext``, no remote code) plus the
model card and a sample grid, assembled in a temporary folder and moved in file by file under a journal
(:func:`diffusers_ddpm_ext.rundir.publish_dir`). The Hub copy is :func:`diffusers_ddpm_ext.hub.export_pipeline`'s
folder (self-contained module files, so plain diffusers loads the repo), pushed as one commit. The local pipeline
is published before the upload starts, so neither a failed nor a killed upload costs it; every push's outcome is
recorded for ``metrics.json``.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Dict, List, Mapping, Optional

from .checkpoints import assert_finite
from .rundir import (PUBLISH_JOURNAL_NAME, TMP_PREFIX, apply_umask, files_under, fsync_tree, publish_dir,
                     remove_tree_safely, writing)

logger = logging.getLogger(__name__)

# Flags never written into the model card, training_args.json or the trackers (secrets and local paths).
_PRIVATE_FLAGS = {"hub_token", "local_rank", "logging_dir", "cache_dir"}


def public_training_config(flags: Mapping[str, Any]) -> Dict[str, Any]:
    """The flags worth recording (model card, trackers, ``training_args.json``): secrets, paths and ``debug_*``
    flags removed. ``flags`` is ``vars(args)`` of the training script."""
    return {k: v for k, v in sorted(flags.items()) if k not in _PRIVATE_FLAGS and not k.startswith("debug_")}


def default_repo_name(output_dir: str) -> str:
    """A valid Hub repo name from the output folder's name (used when --hub_model_id is not given)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", os.path.basename(os.path.abspath(output_dir))).strip(".-")
    return (name or "ddpm-model")[:96]


def push_failure_line(exc: Exception) -> str:
    """One line for a failed push, without hub.push_to_hub's advice to re-push its export folder (ours is gone)."""
    return f"{type(exc).__name__}: " + str(exc).split(" Nothing local was changed (")[0]


class RunPublisher:
    """Exports a :class:`~diffusers_ddpm_ext.trainer.Trainer`'s EMA pipeline into its output folder and pushes it.

    Args:
        trainer: the trainer (its ``output_dir`` is where the pipeline goes).
        training_config: recorded in the model card (:func:`public_training_config`).
        dataset_name: the dataset id for the card's metadata (None for local data).
        save_model_epochs: :meth:`on_epoch_end` exports every N epochs (None = only the final export).
        push_to_hub: push an export at every save (unless ``hub_strategy="end"``) and at the end.
        hub_model_id: the repo (default: the output folder's name, :func:`default_repo_name`).
        hub_token, hub_private_repo: as for :func:`diffusers_ddpm_ext.hub.push_to_hub`.
        hub_strategy: ``"every_save"`` (None means the same) or ``"end"``.
    """

    def __init__(self, trainer, training_config: Mapping[str, Any], *, dataset_name: Optional[str] = None,
                 save_model_epochs: Optional[int] = None, push_to_hub: bool = False,
                 hub_model_id: Optional[str] = None, hub_token: Optional[str] = None, hub_private_repo: bool = False,
                 hub_strategy: Optional[str] = None):
        if trainer.output_dir is None:
            raise ValueError("RunPublisher needs a trainer with an output_dir")
        self.trainer, self.output_dir, self.training_config = trainer, trainer.output_dir, dict(training_config)
        self.datasets = [dataset_name] if dataset_name else None
        self.save_model_epochs, self.push_to_hub, self.hub_strategy = save_model_epochs, push_to_hub, hub_strategy
        self.hub_model_id, self.hub_token, self.hub_private_repo = hub_model_id, hub_token, hub_private_repo
        self.repo_id = hub_model_id or default_repo_name(self.output_dir)
        self.pushes: List[Dict[str, Any]] = []  # outcome of every push of this process, for metrics.json
        self.kept_export: Optional[str] = None  # the export kept after a failed final upload, for the retry

    def publish(self, card_metrics: Optional[dict] = None, commit_message: Optional[str] = None,
                keep_failed_upload: bool = False) -> Optional[Exception]:
        """Publish the pipeline (EMA weights) into the output folder; with a ``commit_message``, push it too.

        Every process calls this; the main process does the work. With ``keep_failed_upload``, a complete
        export whose upload failed is moved next to the output folder (``<output_dir>-hub``, numbered if taken)
        and remembered in :attr:`kept_export`, so the retry is one push.

        Returns:
            The exception that stopped the Hub export or push (main process; None when it succeeded or there
            was none). The caller decides whether it is fatal.
        """
        trainer, error = self.trainer, None
        if trainer.accelerator.is_main_process:
            error = self._publish(card_metrics, commit_message, keep_failed_upload)
        trainer.accelerator.wait_for_everyone()
        return error

    def _publish(self, card_metrics, commit_message, keep_failed_upload) -> Optional[Exception]:
        from . import hub

        trainer, config, out, error = self.trainer, self.trainer.config, self.output_dir, None
        grid = trainer.sample_grid()
        stage = os.path.join(out, f"{TMP_PREFIX}pipeline-{os.getpid()}")
        hub_dir = os.path.join(out, f"{TMP_PREFIX}hub-{os.getpid()}")
        card_repo_id = self.hub_model_id or f"your-username/{default_repo_name(out)}"
        try:
            with trainer.ema_weights():
                assert_finite(dict(trainer.unwrapped.state_dict()), "exported weights")
                pipe = trainer.pipeline()
                steps = config.ddpm_num_inference_steps
                with writing(f"the pipeline export in {stage}"):  # a full disk: one line, nothing published
                    pipe.save_pretrained(stage, safe_serialization=True)
                    grid.save(os.path.join(stage, hub.GRID_NAME))
                    hub.render_model_card(pipe, repo_id=card_repo_id, metrics=card_metrics,
                                          training_config=self.training_config, datasets=self.datasets,
                                          sample_grid=hub.GRID_NAME, num_inference_steps=steps,
                                          sample_grid_caption=f"EMA samples, {steps} steps, seed {config.seed}.",
                                          local_dir_name=os.path.basename(os.path.normpath(out)),
                                          ).save(os.path.join(stage, "README.md"))
                    apply_umask(stage)  # safetensors writes the weights 0600
                    fsync_tree(stage)
                if commit_message is not None:
                    try:
                        hub.export_pipeline(pipe, hub_dir, sample_grid=grid, metrics=card_metrics,
                                            training_config=self.training_config, repo_id=card_repo_id,
                                            datasets=self.datasets)
                    except Exception as exc:  # the local pipeline is still published below
                        error = exc
            new_files = files_under(stage)
            stale = [f for f in files_under(out) if f.split(os.sep)[0] in ("unet", "scheduler") and f not in new_files]
            publish_dir(stage, out, remove=stale)
            if commit_message is not None and error is None:
                try:
                    hub.push_to_hub(hub_dir, self.repo_id, token=self.hub_token, private=self.hub_private_repo,
                                    commit_message=commit_message)
                except Exception as exc:
                    error = exc
        finally:
            if not os.path.exists(os.path.join(out, PUBLISH_JOURNAL_NAME)):  # else the next start completes it
                remove_tree_safely(stage)
            built = os.path.isfile(os.path.join(hub_dir, "model_index.json"))
            if keep_failed_upload and error is not None and built:
                self.kept_export = self._keep(hub_dir)
            else:
                remove_tree_safely(hub_dir)
        if commit_message is not None:
            self.pushes.append({"commit_message": commit_message, "step": trainer.state.global_step,
                                "ok": error is None, "error": None if error is None else push_failure_line(error)})
        return error

    def _keep(self, hub_dir: str) -> str:
        base = kept = os.path.normpath(self.output_dir) + "-hub"
        number = 1
        while os.path.exists(kept):  # never overwrite an earlier kept export
            number += 1
            kept = f"{base}-{number}"
        os.replace(hub_dir, kept)
        apply_umask(kept)  # the export's temporary folder and weights were private (0700/0600)
        return kept

    def on_epoch_end(self, trainer, epoch: int) -> None:
        """``Trainer.run``'s hook: every ``save_model_epochs`` epochs, publish (and push, unless the strategy is
        ``end``). A failed push is a warning: hours of training are worth more than one snapshot."""
        if not self.save_model_epochs or (epoch + 1) % self.save_model_epochs:
            return
        push = self.push_to_hub and self.hub_strategy != "end"
        message = f"Epoch {epoch + 1}, step {trainer.state.global_step}"
        error = self.publish(commit_message=message if push else None)
        if error is not None:
            logger.warning("pushing %r to %s failed; training goes on (the next save point and the end of training "
                           "push again). %s", message, self.repo_id, push_failure_line(error))

    def publish_final(self, metrics: Mapping[str, Any]) -> Optional[Exception]:
        """The end-of-training export and its push. The model card shows the quality metrics of ``metrics``
        (``Trainer.report``'s: bits/dim of the process the model samples with and, when measured, FD/KID/precision/
        recall), each with its split, N and method (``model_card.card_metric_rows``)."""
        state, card_metrics, message = self.trainer.state, None, None
        if self.trainer.accelerator.is_main_process:
            card_metrics = dict(metrics)
        if self.push_to_hub:
            message = f"End of training: epoch {state.epoch + 1}, step {state.global_step}"
            if card_metrics is not None:
                message += f", bits/dim {round(card_metrics['bits_per_dim'], 4)}"
        return self.publish(card_metrics, commit_message=message, keep_failed_upload=True)

    def final_push_error(self, error: Exception):
        """The ``HubPushError`` for a failed final upload: what failed, that the run completed, the retry command."""
        from .hub import HubPushError

        out, private = self.output_dir, " --private" if self.hub_private_repo else ""
        if self.kept_export:  # the export (model card included) was built; only its upload failed
            retry = f"`python -m diffusers_ddpm_ext.hub push {self.kept_export} {self.repo_id}{private}`"
        else:  # the export itself failed: rebuild it beside the output folder (an export may not lie inside it)
            export_dir = os.path.normpath(out) + "-hub"
            retry = (f"`python -m diffusers_ddpm_ext.hub export {out} {export_dir} --repo-id {self.repo_id} --metrics "
                     f"{os.path.join(out, 'metrics.json')}` then `python -m diffusers_ddpm_ext.hub push {export_dir} "
                     f"{self.repo_id}{private}`")
        return HubPushError(f"{push_failure_line(error)} The run itself completed: {out} holds the pipeline, "
                            f"metrics.json and checkpoints. Retry the upload with {retry}.")

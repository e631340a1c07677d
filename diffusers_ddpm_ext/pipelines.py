"""Image sampling for Gaussian-diffusion UNets with any diffusers scheduler, learned variances and classifier-free guidance.

:class:`GaussianDiffusionPipeline` samples our ``DDPMUNet2DModel`` and diffusers' ``UNet2DModel`` with every
diffusers scheduler (DDPM, DDIM, DPM-Solver++, Euler, Euler ancestral, UniPC, Heun, PNDM, ...) and ours
(``GaussianDiffusionScheduler``), unconditional or class-conditional, ε-only or with a learned variance.
Where diffusers' ``DDPMPipeline`` / ``DDIMPipeline`` are correct it draws the same images; it differs where they
are not (all tested):

* a learned-variance UNet (``2 C`` output channels) keeps its variance channels only for schedulers that read them
  (``DDPMScheduler`` / ``DDPMParallelScheduler`` / ours with ``variance_type`` learned or learned_range); every
  other scheduler gets the first ``C`` (diffusers' pipelines pass all ``2 C`` and fail, and
  ``DPMSolverMultistepScheduler(variance_type="learned_range")`` keeps 3 channels whatever ``C`` is);
* it scales the initial noise by ``scheduler.init_noise_sigma``, read after ``set_timesteps`` (the σ of the
  chain being sampled), and calls ``scheduler.scale_model_input`` (``DDPMPipeline`` does neither, which silently
  breaks the Euler family);
* it passes ``generator`` (and ``eta`` / ``use_clipped_model_output``) only to a ``step`` whose signature takes it
  (``DDPMPipeline`` passes ``generator`` to every scheduler: UniPC, Heun and PNDM raise ``TypeError``);
* with a float16 / bfloat16 UNet the sample is kept in float32 between steps (the UNet still runs in its own
  dtype), and every ``output_type`` works in every dtype; ``latents=``, ``callback_on_step_end`` and
  ``output_type="latent"`` are supported.

``ClassConditionalDDPMPipeline`` is the same pipeline with the argument order of its first release (saved folders
name it).

This module is self-contained (torch and diffusers only, no import from ``diffusers_ddpm_ext``): the Hub export
(:mod:`diffusers_ddpm_ext.hub`) copies it verbatim into exported repos as remote code, so that plain
``DiffusionPipeline.from_pretrained(repo, trust_remote_code=True)`` can build the pipeline without our package.

Guidance convention (Ho & Salimans 2022, "Classifier-Free Diffusion Guidance", eq. 6 rewritten around the
unconditional prediction, as in GLIDE, Nichol et al. 2022 eq. 4)::

    eps = eps_uncond + w * (eps_cond - eps_uncond)

* ``w = 0``: purely unconditional, i.e. the model is queried with the null class only (the class labels
  are ignored);
* ``w = 1``: purely conditional (no guidance), the model is queried with the given labels only;
* ``w > 1``: guided, extrapolating away from the unconditional prediction (one batched forward pass of
  ``2 B`` samples per step: conditional half first, unconditional half second);
* ``0 < w < 1``: interpolation between the two, also one batched forward pass.

When the UNet predicts a learned variance (``2 C`` output channels) the formula applies to the first
``C`` channels only (the noise / x0 / v prediction); the variance half of the conditional prediction is kept,
as in GLIDE, because the guided mean is not the mean the unconditional variance was trained for.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import diffusers
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.models.modeling_utils import ModelMixin
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# Copied from diffusers_ddpm_ext.scheduler.LEARNED_VARIANCE_TYPES (this file is self-contained: Hub remote code)
LEARNED_VARIANCE_TYPES = ("learned", "learned_range")
# Schedulers whose `step` reads a predicted variance from output channels C..2C when their `variance_type` is
# learned / learned_range (matched by class name through the MRO, so remote-code copies of ours count too).
# DPMSolverMultistepScheduler also has a `variance_type` key, but only to drop those channels (as `[:, :3]`).
VARIANCE_READING_SCHEDULERS = ("GaussianDiffusionScheduler", "DDPMScheduler", "DDPMParallelScheduler")
# Floating dtypes too coarse to carry the sample between steps: the chain runs in float32, the UNet in its dtype.
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def null_class_label(unet) -> Optional[int]:
    """The index of the null ("no class") label of a class-conditional UNet, or None when it has none.

    Our ``DDPMUNet2DModel`` exposes it as ``unet.null_class_label`` (its class table has one extra row after the
    ``num_class_embeds`` real classes). diffusers' ``UNet2DModel`` has no null class: pass
    ``null_class_label=`` to the pipeline call if such a model was trained with one of its classes as the null class.
    """
    label = getattr(unet, "null_class_label", None)
    return None if label is None else int(label)


_unet_null_class = null_class_label  # inside `__call__` the argument of the same name shadows the function


def guided_model_output(
    cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float, sample_channels: int
) -> torch.Tensor:
    """Combine conditional and unconditional predictions: ``uncond + w * (cond - uncond)``.

    Args:
        cond: UNet output for the real labels, (B, C or 2C, H, W).
        uncond: UNet output for the null class, same shape.
        guidance_scale: ``w``; 0 gives ``uncond``, 1 gives ``cond``.
        sample_channels: ``C``, the number of image channels. With ``2C`` output channels the second half is a
            learned variance and is taken from ``cond`` unchanged (GLIDE).

    Returns:
        The guided prediction, same shape as ``cond``.
    """
    guided = uncond[:, :sample_channels] + guidance_scale * (cond[:, :sample_channels] - uncond[:, :sample_channels])
    if cond.shape[1] == sample_channels:
        return guided
    return torch.cat([guided, cond[:, sample_channels:]], dim=1)  # (B, 2C, H, W)


def scheduler_reads_predicted_variance(scheduler) -> bool:
    """Whether ``scheduler.step`` uses the variance channels of a ``2 C``-channel model output.

    True for ``DDPMScheduler``, ``DDPMParallelScheduler`` and ``GaussianDiffusionScheduler`` configured with
    ``variance_type`` ``"learned"`` or ``"learned_range"``; every other scheduler must get the first ``C`` channels.
    """
    names = {klass.__name__ for klass in type(scheduler).__mro__}
    variance_type = getattr(getattr(scheduler, "config", None), "variance_type", None)
    return bool(names.intersection(VARIANCE_READING_SCHEDULERS)) and variance_type in LEARNED_VARIANCE_TYPES


def _accepts(function: Callable, name: str) -> bool:
    return name in inspect.signature(function).parameters


class GaussianDiffusionPipeline(DiffusionPipeline):
    r"""Sample images from a diffusion UNet with any diffusers scheduler (or ours), optionally class-conditional.

    Args:
        unet: A denoiser called as ``unet(sample, t).sample`` (unconditional) or
            ``unet(sample, t, class_labels=labels).sample`` (when ``config.num_class_embeds`` is set), e.g. our
            ``DDPMUNet2DModel`` or diffusers' ``UNet2DModel``. Its output has ``C`` channels (ε, x0 or v) or ``2 C``
            (plus a learned variance), ``C = config.in_channels``.
        scheduler: Any diffusers scheduler (``set_timesteps``, ``step``, ``init_noise_sigma``,
            ``scale_model_input``), e.g. ``GaussianDiffusionScheduler``, ``DDPMScheduler``, ``DDIMScheduler``,
            ``DPMSolverMultistepScheduler``, ``EulerDiscreteScheduler``, ``UniPCMultistepScheduler``.

    Swap schedulers with ``from_config`` (``pipe.scheduler = DPMSolverMultistepScheduler.from_config(
    pipe.scheduler.config)``) and pipelines with ``from_pipe`` (``GaussianDiffusionPipeline.from_pipe(ddpm_pipe)``
    takes over the UNet and scheduler of a ``DDPMPipeline``).
    """

    model_cpu_offload_seq = "unet"
    # `latents` can be replaced by a callback; `model_output` (this step's, after guidance) is read-only.
    _callback_tensor_inputs = ["latents", "model_output"]

    def __init__(self, unet: ModelMixin, scheduler: SchedulerMixin):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @classmethod
    def from_pipe(cls, pipeline: DiffusionPipeline, **kwargs) -> "GaussianDiffusionPipeline":
        """Build this pipeline from another one's components, sharing their memory (``DiffusionPipeline.from_pipe``).

        diffusers' ``from_pipe`` takes over a model only if its exact class appears in the new pipeline's
        ``__init__`` type hints; this pipeline takes any UNet, so the source's ``unet`` and ``scheduler`` are passed
        on explicitly (keyword arguments override them, e.g. ``scheduler=DDIMScheduler.from_config(...)``).
        diffusers also casts the new pipeline, and with it the shared UNet, to ``dtype`` (float32 when not given);
        here the default is the shared UNet's own dtype, so a bfloat16 source stays bfloat16.
        """
        for name in ("unet", "scheduler"):
            if name not in kwargs and pipeline.components.get(name) is not None:
                kwargs[name] = pipeline.components[name]
        unet = kwargs.get("unet")
        if kwargs.get("dtype") is None and kwargs.get("torch_dtype") is None and isinstance(unet, torch.nn.Module):
            kwargs["dtype"] = unet.dtype
        return super().from_pipe(pipeline, **kwargs)

    # ------------------------------------------------------------------------------------------ properties
    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """Set ``pipe._interrupt = True`` in a callback to skip the remaining denoising steps."""
        return self._interrupt

    # ------------------------------------------------------------------------------------------ checks
    def _image_shape(self) -> Tuple[int, ...]:
        config = self.unet.config
        dims = getattr(config, "dims", 2)
        if dims != 2:  # fail before sampling, not after it when the images are converted
            raise ValueError(f"this pipeline samples images: it needs a `dims`=2 UNet, got `dims`={dims!r} "
                             "(allowed: [2]); sample 1D/3D models with the scheduler directly.")
        size = config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        return (config.in_channels, *size)

    def _labels_tensor(
        self, class_labels, batch_size: Optional[int], null: Optional[int], device
    ) -> Optional[torch.Tensor]:
        """Validate ``class_labels`` and return them as a (B,) int64 tensor (None for an unconditional UNet)."""
        num_classes = getattr(self.unet.config, "num_class_embeds", None)
        if not num_classes:
            if class_labels is not None:
                raise ValueError(
                    f"`class_labels`={class_labels!r} given but the UNet is not class-conditional "
                    "(`unet.config.num_class_embeds` is None); pass class_labels=None."
                )
            return None
        if class_labels is None:
            if null is None:
                raise ValueError(
                    f"this {type(self.unet).__name__} is class-conditional without a null class: pass `class_labels` "
                    f"(0..{num_classes - 1}), or `null_class_label`=K if it was trained with class K as the null class."
                )
            return torch.full((batch_size or 1,), null, dtype=torch.long, device=device)
        if isinstance(class_labels, int) and not isinstance(class_labels, bool):
            class_labels = [class_labels]
        if isinstance(class_labels, torch.Tensor):
            if class_labels.dtype.is_floating_point or class_labels.dtype == torch.bool:
                raise TypeError(f"`class_labels` must hold integers, got a tensor of dtype {class_labels.dtype}.")
            labels = class_labels.reshape(-1).to(device=device, dtype=torch.long)
        elif isinstance(class_labels, (list, tuple)):
            if not all(isinstance(c, int) and not isinstance(c, bool) for c in class_labels):
                raise TypeError(f"`class_labels` must be ints, got {class_labels!r}.")
            labels = torch.tensor(list(class_labels), dtype=torch.long, device=device)
        else:
            raise TypeError(
                f"`class_labels` must be None, an int, a list of ints or an int tensor, got {type(class_labels)}."
            )
        if labels.numel() == 0:
            raise ValueError("`class_labels` is empty; pass at least one label or None for unconditional samples.")
        top = max(num_classes - 1, null if null is not None else -1)
        bad = labels[(labels < 0) | (labels > top)]
        if bad.numel():
            allowed = f"0..{top}" + (f" ({null} is the null class, i.e. an unconditional sample)" if null is not None
                                     else "")
            raise ValueError(f"class label(s) {bad.tolist()} out of range: allowed are {allowed}.")
        if batch_size is not None and batch_size != labels.numel():
            raise ValueError(f"`batch_size`={batch_size} does not match the {labels.numel()} class labels given.")
        return labels

    def _step_kwargs(self, generator, eta, use_clipped_model_output) -> Dict[str, Any]:
        """Keyword arguments for ``scheduler.step``: only those its signature takes."""
        step = self.scheduler.step
        kwargs: Dict[str, Any] = {}
        if generator is not None and _accepts(step, "generator"):  # UniPC, Heun, PNDM take none
            kwargs["generator"] = generator
        for name, value in (("eta", eta), ("use_clipped_model_output", use_clipped_model_output)):
            if value is None:
                continue
            if not _accepts(step, name):
                raise ValueError(f"`{name}`={value!r} given but {type(self.scheduler).__name__}.step takes no "
                                 f"`{name}` (DDIMScheduler's does); leave it None for this scheduler.")
            kwargs[name] = value
        return kwargs

    # ------------------------------------------------------------------------------------------ sampling
    @torch.no_grad()
    def __call__(
        self,
        batch_size: Optional[int] = None,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        num_inference_steps: Union[int, str] = 1000,
        output_type: str = "pil",
        return_dict: bool = True,
        *,
        class_labels: Optional[Union[int, List[int], torch.Tensor]] = None,
        guidance_scale: float = 1.0,
        null_class_label: Optional[int] = None,
        latents: Optional[torch.Tensor] = None,
        eta: Optional[float] = None,
        use_clipped_model_output: Optional[bool] = None,
        callback_on_step_end: Optional[
            Union[Callable[[DiffusionPipeline, int, Any, Dict], Dict], PipelineCallback, MultiPipelineCallbacks]
        ] = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> Union[ImagePipelineOutput, Tuple]:
        r"""Generate images.

        Args:
            batch_size: Number of images (default: the number of ``class_labels``, else ``latents``' batch, else 1).
            generator: Generator(s) for the initial noise and, where ``scheduler.step`` takes one, its noise. A list
                gives one generator per image.
            num_inference_steps: Steps given to ``scheduler.set_timesteps`` (our scheduler also takes IDM respacing
                strings such as ``"ddim50"``). Multistep/second-order schedulers (PNDM, Heun) run more UNet calls.
            output_type: ``"pil"`` (list of ``PIL.Image``), ``"np"`` ((B, H, W, C) float32 array in [0, 1]),
                ``"pt"`` ((B, C, H, W) tensor in [0, 1]) or ``"latent"`` (the final sample, (B, C, H, W), in
                [-1, 1] up to the model's error, not clamped).
            return_dict: Return an :class:`~diffusers.ImagePipelineOutput` instead of a tuple.
            class_labels: Class index per image for a class-conditional UNet (``0 .. num_class_embeds - 1``; the null
                index asks for an unconditional image). ``None`` samples ``batch_size`` unconditional images (null
                class). Must be None for an unconditional UNet.
            guidance_scale: ``w`` in ``eps = eps_uncond + w * (eps_cond - eps_uncond)``. 0 = unconditional (null
                class only), 1 = conditional without guidance (default), > 1 = classifier-free guidance. Values other
                than 1 need a class-conditional UNet with a null class.
            null_class_label: The null class of a UNet that has no ``null_class_label`` attribute (a ``UNet2DModel``
                trained with one of its classes as the null class). Default: ``unet.null_class_label``.
            latents: Initial noise, (B, C, H, W), drawn from N(0, I); it is multiplied by
                ``scheduler.init_noise_sigma`` (of the chain ``num_inference_steps`` sets) as generated noise is.
                Default: drawn with ``generator``.
            eta: DDIM's η, passed to a ``step`` that takes it (error otherwise); None keeps the scheduler's default.
            use_clipped_model_output: Passed to a ``step`` that takes it (DDIM); error otherwise.
            callback_on_step_end: ``fn(pipe, step_index, timestep, callback_kwargs) -> dict`` called after every
                step, or a ``PipelineCallback`` / ``MultiPipelineCallbacks``. A ``"latents"`` entry in the returned
                dict replaces the sample.
            callback_on_step_end_tensor_inputs: Names put into ``callback_kwargs``, from
                ``_callback_tensor_inputs`` (``"latents"``, ``"model_output"``).

        Returns:
            :class:`~diffusers.ImagePipelineOutput` or ``(images,)``.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if not isinstance(guidance_scale, (int, float)) or isinstance(guidance_scale, bool) or guidance_scale < 0:
            raise ValueError(f"`guidance_scale` must be a float >= 0, got {guidance_scale!r}.")
        if isinstance(num_inference_steps, bool) or not (
                isinstance(num_inference_steps, str) or (isinstance(num_inference_steps, int) and num_inference_steps > 0)):
            raise ValueError(f"`num_inference_steps` must be a positive int (or, for our scheduler, a respacing "
                             f"string), got {num_inference_steps!r}.")
        if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool)
                                       or batch_size < 1):
            raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}.")
        if null_class_label is not None and (not isinstance(null_class_label, int) or null_class_label < 0):
            raise ValueError(f"`null_class_label` must be an int >= 0, got {null_class_label!r}.")
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(f"`callback_on_step_end_tensor_inputs` {unknown} not allowed; choose from "
                             f"{self._callback_tensor_inputs}.")
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise TypeError(f"`callback_on_step_end` must be callable, got {type(callback_on_step_end)}.")
        image_shape = self._image_shape()  # (C, H, W)
        channels = image_shape[0]
        out_channels = getattr(self.unet.config, "out_channels", None) or channels
        if out_channels not in (channels, 2 * channels):
            raise ValueError(f"the UNet has out_channels={out_channels}; this pipeline needs in_channels={channels} "
                             f"(a prediction) or {2 * channels} (prediction + learned variance).")

        device = self._execution_device
        if latents is not None:
            if not isinstance(latents, torch.Tensor) or latents.dim() != 4 or tuple(latents.shape[1:]) != image_shape:
                got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents)
                raise ValueError(f"`latents` must be a tensor of shape (B, {', '.join(map(str, image_shape))}), "
                                 f"got {got}.")
            if batch_size is None and class_labels is None:
                batch_size = latents.shape[0]
        null = null_class_label if null_class_label is not None else _unet_null_class(self.unet)
        labels = self._labels_tensor(class_labels, batch_size, null, device)  # (B,) or None
        num_images = labels.shape[0] if labels is not None else (batch_size or 1)
        if latents is not None and latents.shape[0] != num_images:
            raise ValueError(f"`latents` hold {latents.shape[0]} samples but {num_images} images were asked for.")
        if isinstance(generator, list) and len(generator) != num_images:
            raise ValueError(f"{len(generator)} generators given for {num_images} images; pass one per image.")

        # Which labels the UNet sees: w = 0 and w = 1 need one prediction, anything else both in one batch.
        w = float(guidance_scale)
        if labels is None:
            if w != 1.0:
                raise ValueError(f"`guidance_scale`={guidance_scale} needs a class-conditional UNet; this one is "
                                 "unconditional (use 1.0).")
            model_labels = None
        elif w == 1.0:
            model_labels = labels
        elif null is None:
            raise ValueError(f"`guidance_scale`={guidance_scale} needs a null class, which this "
                             f"{type(self.unet).__name__} has not; pass `null_class_label`=K if it was trained with "
                             "class K as the null class, or use guidance_scale=1.0.")
        elif w == 0.0:
            model_labels = torch.full_like(labels, null)
        else:
            model_labels = torch.cat([labels, torch.full_like(labels, null)])  # (2B,): conditional half first
        doubled = model_labels is not None and model_labels.shape[0] != num_images

        # The chain first: `init_noise_sigma` of the Euler family (and Heun, KDPM2, LMS) is the largest σ of the
        # chain `set_timesteps` builds ("leading" spacing: not the training chain's σ_max), as diffusers' pipelines
        # order it. Read before, it is the σ of the previous call's chain, or of the full chain after a swap.
        timestep_kwargs = {"device": device} if _accepts(self.scheduler.set_timesteps, "device") else {}
        self.scheduler.set_timesteps(num_inference_steps, **timestep_kwargs)
        timesteps = self.scheduler.timesteps

        unet_dtype = self.unet.dtype
        sample_dtype = torch.float32 if unet_dtype in _LOW_PRECISION else unet_dtype
        shape = (num_images, *image_shape)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=sample_dtype)  # (B, C, H, W)
        else:
            latents = latents.to(device=device, dtype=sample_dtype)
        latents = latents * self.scheduler.init_noise_sigma
        step_kwargs = self._step_kwargs(generator, eta, use_clipped_model_output)
        keep_variance = scheduler_reads_predicted_variance(self.scheduler)
        self._guidance_scale, self._num_timesteps, self._interrupt = w, len(timesteps), False

        for i, t in enumerate(self.progress_bar(timesteps)):
            if self._interrupt:
                continue
            model_input = self.scheduler.scale_model_input(latents, t)  # (B, C, H, W)
            if doubled:
                model_input = torch.cat([model_input, model_input])  # (2B, C, H, W)
            model_input = model_input.to(unet_dtype)
            if model_labels is None:
                model_output = self.unet(model_input, t).sample  # (B, C or 2C, H, W)
            else:
                model_output = self.unet(model_input, t, class_labels=model_labels).sample  # (B or 2B, ...)
            model_output = model_output.to(sample_dtype)
            if doubled:
                cond, uncond = model_output.chunk(2)
                model_output = guided_model_output(cond, uncond, w, channels)  # (B, C or 2C, H, W)
            if not keep_variance:
                model_output = model_output[:, :channels]  # (B, C, H, W)
            latents = self.scheduler.step(model_output, t, latents, **step_kwargs).prev_sample
            if callback_on_step_end is not None:
                available = {"latents": latents, "model_output": model_output}
                callback_kwargs = {k: available[k] for k in callback_on_step_end_tensor_inputs}
                callback_outputs = callback_on_step_end(self, i, t, callback_kwargs) or {}
                latents = callback_outputs.pop("latents", latents)

        if output_type == "latent":
            image = latents
        else:
            image = (latents / 2 + 0.5).clamp(0, 1)  # (B, C, H, W) in [0, 1]
            if output_type != "pt":
                image = image.cpu().permute(0, 2, 3, 1).float().numpy()  # (B, H, W, C)
                if output_type == "pil":
                    image = self.numpy_to_pil(image)

        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)


class ClassConditionalDDPMPipeline(GaussianDiffusionPipeline):
    r"""`GaussianDiffusionPipeline` with the positional argument order of its first release (class labels first).

    Kept because pipelines saved by earlier releases name this class in ``model_index.json``. Everything
    :class:`GaussianDiffusionPipeline` does works here: any scheduler, ``latents``, callbacks, output types.

    Args:
        unet: A class-conditional denoiser called as ``unet(sample, timestep, class_labels).sample`` whose
            ``config.num_class_embeds`` is the number of real classes and whose embedding table has one extra
            row, the null class, at index ``num_class_embeds`` (``DDPMUNet2DModel`` with ``num_class_embeds``).
        scheduler: Any diffusers scheduler, e.g. ``GaussianDiffusionScheduler``, ``DDPMScheduler`` or
            ``DPMSolverMultistepScheduler``.
    """

    def __call__(
        self,
        class_labels: Optional[Union[int, List[int], torch.Tensor]] = None,
        guidance_scale: float = 1.0,
        num_inference_steps: Union[int, str] = 1000,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        batch_size: Optional[int] = None,
        **kwargs,
    ) -> Union[ImagePipelineOutput, Tuple]:
        r"""Generate one image per class label (see :meth:`GaussianDiffusionPipeline.__call__` for every argument).

        Args:
            class_labels: Class index per image; ``None`` samples ``batch_size`` unconditional images.
            guidance_scale: 0 = unconditional (null class), 1 = conditional (default), > 1 = classifier-free guidance.
            num_inference_steps, generator, output_type, return_dict, batch_size: As in ``GaussianDiffusionPipeline``.
            **kwargs: ``latents``, ``null_class_label``, ``eta``, ``use_clipped_model_output``,
                ``callback_on_step_end``, ``callback_on_step_end_tensor_inputs``.
        """
        return super().__call__(batch_size=batch_size, generator=generator, num_inference_steps=num_inference_steps,
                                output_type=output_type, return_dict=return_dict, class_labels=class_labels,
                                guidance_scale=guidance_scale, **kwargs)


def _register_in_diffusers_namespace(*classes) -> None:
    """Make ``DiffusionPipeline.from_pretrained(folder)`` find our pipelines by the name saved in model_index.json.

    diffusers 0.42 resolves a plain-string ``_class_name`` as ``getattr(diffusers, name)``
    (``pipeline_loading_utils._get_pipeline_class``); a list ``[module, name]`` is read only as a file
    ``<module>.py`` inside the folder (remote code), never as an installed module. Adding the classes to the
    ``diffusers`` namespace is therefore what makes a saved folder load once this module is imported, exactly
    like our components (whose installed modules diffusers imports by name). A diffusers class of the same name is
    never replaced.
    """
    for klass in classes:
        existing = getattr(diffusers, klass.__name__, None)
        if existing is None or getattr(existing, "__module__", None) == klass.__module__:
            setattr(diffusers, klass.__name__, klass)


# Only the installed package registers: a remote-code copy of this file (the Hub export) must not shadow it.
if __name__ == "diffusers_ddpm_ext.pipelines":
    _register_in_diffusers_namespace(GaussianDiffusionPipeline, ClassConditionalDDPMPipeline)

"""Class-conditional DDPM sampling with classifier-free guidance through a learned null class.

This module is self-contained (torch and diffusers only, no import from ``diffusers_ddpm_ext``): the Hub
export (:mod:`diffusers_ddpm_ext.hub`) copies it verbatim into exported repos as remote code, so that plain
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

from typing import List, Optional, Tuple, Union

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

OUTPUT_TYPES = ("pil", "np", "pt")


def null_class_label(unet) -> int:
    """The index of the null ("no class") embedding row of a class-conditional UNet.

    Our ``DDPMUNet2DModel`` exposes it as ``unet.null_class_label``; by its config contract it equals
    ``num_class_embeds`` (the table has one extra row after the real classes).
    """
    label = getattr(unet, "null_class_label", None)
    if label is not None:
        return int(label)
    num_classes = getattr(unet.config, "num_class_embeds", None)
    if num_classes is None:
        raise ValueError(
            "The UNet is not class-conditional (`unet.config.num_class_embeds` is None); use `DDPMPipeline` for"
            " unconditional models."
        )
    return int(num_classes)


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


class ClassConditionalDDPMPipeline(DiffusionPipeline):
    r"""Ancestral (or any diffusers scheduler's) sampling from a class-conditional UNet with classifier-free guidance.

    Args:
        unet: A class-conditional denoiser called as ``unet(sample, timestep, class_labels).sample`` whose
            ``config.num_class_embeds`` is the number of real classes and whose embedding table has one extra
            row, the null class, at index ``num_class_embeds`` (``DDPMUNet2DModel`` with ``num_class_embeds``).
        scheduler: A scheduler with ``set_timesteps`` and ``step(model_output, t, sample, generator=...)``,
            e.g. ``GaussianDiffusionScheduler``, ``DDPMScheduler`` or ``DDIMScheduler``.
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: ModelMixin, scheduler: SchedulerMixin):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    def _labels_tensor(self, class_labels, batch_size: Optional[int], device) -> torch.Tensor:
        """Validate ``class_labels`` and return them as a (B,) int64 tensor."""
        null = null_class_label(self.unet)
        if class_labels is None:
            batch_size = 1 if batch_size is None else batch_size
            if not isinstance(batch_size, int) or batch_size < 1:
                raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}.")
            return torch.full((batch_size,), null, dtype=torch.long, device=device)
        if isinstance(class_labels, int):
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
        bad = labels[(labels < 0) | (labels > null)]
        if bad.numel():
            raise ValueError(
                f"class label(s) {bad.tolist()} out of range: allowed are 0..{null - 1} (real classes) and {null}"
                " (the null class, i.e. an unconditional sample)."
            )
        if batch_size is not None and batch_size != labels.numel():
            raise ValueError(f"`batch_size`={batch_size} does not match the {labels.numel()} class labels given.")
        return labels

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Optional[Union[int, List[int], torch.Tensor]] = None,
        guidance_scale: float = 1.0,
        num_inference_steps: int = 1000,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        batch_size: Optional[int] = None,
    ) -> Union[ImagePipelineOutput, Tuple]:
        r"""Generate one image per class label.

        Args:
            class_labels: Class index per image (``0 .. num_class_embeds - 1``; the null index
                ``num_class_embeds`` asks for an unconditional image). ``None`` samples ``batch_size``
                unconditional images.
            guidance_scale: ``w`` in ``eps = eps_uncond + w * (eps_cond - eps_uncond)``. 0 = unconditional (null
                class only), 1 = conditional without guidance (default), > 1 = classifier-free guidance.
            num_inference_steps: Number of denoising steps given to ``scheduler.set_timesteps``.
            generator: Generator(s) for the initial noise and the scheduler's stochastic steps.
            output_type: ``"pil"`` (list of ``PIL.Image``), ``"np"`` ((B, H, W, C) float array in [0, 1]) or
                ``"pt"`` ((B, C, H, W) tensor in [0, 1]).
            return_dict: Return an :class:`~diffusers.ImagePipelineOutput` instead of a tuple.
            batch_size: Number of images when ``class_labels`` is None; must match the labels otherwise.

        Returns:
            :class:`~diffusers.ImagePipelineOutput` or ``(images,)``.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if not isinstance(guidance_scale, (int, float)) or isinstance(guidance_scale, bool) or guidance_scale < 0:
            raise ValueError(f"`guidance_scale` must be a float >= 0, got {guidance_scale!r}.")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be a positive int, got {num_inference_steps!r}.")
        dims = getattr(self.unet.config, "dims", 2)
        if dims != 2:  # fail before sampling, not after it when the images are converted
            raise ValueError(f"this pipeline samples images: it needs a `dims`=2 UNet, got `dims`={dims!r} "
                             "(allowed: [2]); sample 1D/3D models with the scheduler directly.")

        device = self._execution_device
        labels = self._labels_tensor(class_labels, batch_size, device)  # (B,)
        null = torch.full_like(labels, null_class_label(self.unet))  # (B,)
        w = float(guidance_scale)
        # w = 0 and w = 1 need only one of the two predictions; anything else needs both in one batch.
        if w == 0.0:
            model_labels = null
        elif w == 1.0:
            model_labels = labels
        else:
            model_labels = torch.cat([labels, null])  # (2B,): conditional half first

        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        channels = self.unet.config.in_channels
        shape = (labels.shape[0], channels, *size)
        image = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)  # (B, C, H, W)

        self.scheduler.set_timesteps(num_inference_steps)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = self.scheduler.scale_model_input(image, t)
            if model_labels.shape[0] != labels.shape[0]:
                model_input = torch.cat([model_input, model_input])  # (2B, C, H, W)
            out = self.unet(model_input, t, class_labels=model_labels).sample  # (B or 2B, C or 2C, H, W)
            if model_labels.shape[0] != labels.shape[0]:
                cond, uncond = out.chunk(2)
                out = guided_model_output(cond, uncond, w, channels)
            image = self.scheduler.step(out, t, image, generator=generator).prev_sample

        image = (image / 2 + 0.5).clamp(0, 1)  # (B, C, H, W) in [0, 1]
        if output_type != "pt":
            image = image.cpu().permute(0, 2, 3, 1).float().numpy()  # (B, H, W, C)
            if output_type == "pil":
                image = self.numpy_to_pil(image)

        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)

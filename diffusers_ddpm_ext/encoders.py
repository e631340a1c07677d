"""Pretrained image encoders as feature extractors of sample quality (FD_DINOv2 and friends), and whether the
Hugging Face Hub can be used.

* :func:`load_image_encoder` - any pretrained ``transformers`` image encoder (``AutoModel`` +
  ``AutoImageProcessor``, by Hub id or local folder) as a :class:`PretrainedImageEncoder`; a Hub id comes from the
  cache alone when the Hub cannot be used, and a failure is one line (:class:`EncoderUnavailableError`).
* :func:`hub_offline_reason` - whether the Hub can be used, decided once per process (``HF_HUB_OFFLINE``, else one
  short request to the endpoint), so that an encoder that is not cached fails at once instead of after the Hub
  client's retries (minutes offline).

Re-exported by :mod:`diffusers_ddpm_ext.metrics`, where the rest of sample quality lives.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import TYPE_CHECKING, Optional, Union

import numpy as np
import torch
import torch.nn as nn

if TYPE_CHECKING:
    from .metrics import ArrayLike

DEFAULT_IMAGE_ENCODER = "facebook/dinov2-base"
"""Default encoder for data other than the digits: DINOv2 ViT-B/14, whose CLS-token features give FD_DINOv2
(Stein et al., NeurIPS 2023, "Exposing flaws of generative model evaluation metrics"; reported by EDM2)."""
POOLINGS = ("auto", "cls", "pooler", "mean")


def images_to_uint8(images: ArrayLike) -> np.ndarray:
    """``(B, C, H, W)`` images in ``[-1, 1]`` (C = 1 or 3) to ``(B, H, W, 3)`` uint8 RGB (grey repeated).

    Quantising to 8 bits first makes generated images look to the encoder exactly as if saved as PNG, like
    the real images they are compared with.
    """
    x = torch.as_tensor(images).detach().float().cpu()
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape (B, 1 or 3, H, W), got {tuple(x.shape)}")
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (B, C, H, W)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)  # grey -> RGB: the encoders are trained on colour images
    return x.permute(0, 2, 3, 1).contiguous().numpy()  # (B, H, W, 3)


class PretrainedImageEncoder(nn.Module):
    """Features of a ``transformers`` image encoder (``AutoModel`` + ``AutoImageProcessor``) for
    :func:`sample_quality`; build it with :func:`load_image_encoder`.

    ``self(images)`` takes ``(B, 1 or 3, H, W)`` images in ``[-1, 1]``, quantises them to 8-bit RGB
    (:func:`images_to_uint8`), preprocesses them exactly as the encoder's image processor says (resize, crop,
    rescale, normalise: for DINOv2 bicubic resize of the shorter side to 256, center crop 224, ImageNet mean
    and std), runs the model in chunks of ``batch_size`` on its device and returns ``(B, D)`` features.

    Args:
        model: the loaded ``transformers`` model (``last_hidden_state`` and/or ``pooler_output``).
        processor: its image processor.
        name: the name or path it was loaded from (reported beside the figures).
        pooling: ``"cls"`` = the first token of ``last_hidden_state`` (the CLS token output; for DINOv2 after
            its final layer norm, i.e. the feature of FD_DINOv2), ``"pooler"`` = ``pooler_output``,
            ``"mean"`` = mean over tokens or spatial positions, ``"auto"`` = ``"cls"`` for token outputs
            ``(B, L, D)``, else ``"pooler"`` when the model has one, else ``"mean"`` (convolutional encoders).
        batch_size: images per forward pass.
    """

    def __init__(self, model, processor, name: str, pooling: str = "auto", batch_size: int = 64):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {list(POOLINGS)}, got {pooling!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        self.name = name
        self.pooling = pooling
        self.resolved_pooling = None if pooling == "auto" else pooling  # what "auto" chose, after the first call
        self.batch_size = batch_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def metadata(self) -> dict:
        """What the report says about the encoder."""
        config = self.model.config
        keep = ("do_resize", "size", "do_center_crop", "crop_size", "resample", "do_normalize", "image_mean",
                "image_std")
        settings = self.processor.to_dict() if hasattr(self.processor, "to_dict") else vars(self.processor)
        proc = {k: settings[k] for k in keep if settings.get(k) is not None}
        return {"name": self.name, "model_type": getattr(config, "model_type", None),
                "model_class": type(self.model).__name__, "pooling": self.resolved_pooling or self.pooling,
                "processor": _jsonable(proc)}

    def preprocess(self, images: ArrayLike) -> torch.Tensor:
        """``(B, C, H, W)`` in ``[-1, 1]`` -> ``pixel_values`` as the image processor makes them."""
        from PIL import Image

        pil = [Image.fromarray(a, "RGB") for a in images_to_uint8(images)]
        return self.processor(images=pil, return_tensors="pt")["pixel_values"]  # (B, 3, H', W')

    def _pool(self, out) -> torch.Tensor:
        hidden = getattr(out, "last_hidden_state", None)
        pooled = getattr(out, "pooler_output", None)
        pooling = self.pooling
        if pooling == "auto":
            pooling = "cls" if hidden is not None and hidden.ndim == 3 else ("pooler" if pooled is not None else "mean")
            self.resolved_pooling = pooling
        if pooling == "cls":
            if hidden is None or hidden.ndim != 3:
                raise ValueError(f"pooling 'cls' needs a (B, L, D) last_hidden_state; {type(self.model).__name__} "
                                 f"gives {None if hidden is None else tuple(hidden.shape)}")
            return hidden[:, 0]  # (B, D): the CLS token
        if pooling == "pooler":
            if pooled is None:
                raise ValueError(f"{type(self.model).__name__} has no pooler_output; use pooling 'cls' or 'mean'")
            return pooled.flatten(1)  # (B, D)
        if hidden is None:
            raise ValueError(f"pooling 'mean' needs last_hidden_state, {type(self.model).__name__} has none")
        return hidden.mean(1) if hidden.ndim == 3 else hidden.flatten(2).mean(-1)  # (B, D)

    @torch.no_grad()
    def forward(self, images: ArrayLike) -> torch.Tensor:
        x = torch.as_tensor(images)
        param = next(self.model.parameters())
        out = []
        for i in range(0, len(x), self.batch_size):
            pixels = self.preprocess(x[i:i + self.batch_size]).to(param.device, param.dtype)
            out.append(self._pool(self.model(pixel_values=pixels)).float().cpu())
        return torch.cat(out)  # (B, D)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return int(obj) if hasattr(obj, "__int__") else str(obj)


def default_device() -> torch.device:
    """``cuda`` when available, else ``mps``, else ``cpu``."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


class EncoderUnavailableError(ValueError):
    """An image encoder that cannot be loaded (not a folder, not cached while the Hub cannot be reached, or a failed
    download); the message is one line naming it, the cause and what to do; ``cause`` is the cause alone."""

    def __init__(self, message: str, cause: Optional[str] = None):
        super().__init__(message)
        self.cause = cause or message


HUB_CHECK_TIMEOUT_S = 3.0
"""Seconds :func:`hub_offline_reason` waits for the Hub's answer."""
_HUB_STATUS: dict = {}


def _one_line(text) -> str:
    return " ".join(str(text).split())


def hub_offline_reason(timeout: float = HUB_CHECK_TIMEOUT_S) -> Optional[str]:
    """Why the Hugging Face Hub cannot be used now, in a few words, or None when it answers.

    ``HF_HUB_OFFLINE=1`` (``huggingface_hub.constants.HF_HUB_OFFLINE``) decides without a request; otherwise one
    ``HEAD`` request to ``huggingface_hub.constants.ENDPOINT`` (``HF_ENDPOINT``) waits at most ``timeout`` seconds
    (name resolution included: the request runs in a thread that is abandoned after that). Any HTTP answer counts
    as reachable. The answer is kept for the rest of the process (per endpoint): the Hub client's own retries, ~5
    per file with growing waits (minutes offline), are never reached.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE=1"
    endpoint = constants.ENDPOINT
    if endpoint not in _HUB_STATUS:
        _HUB_STATUS[endpoint] = _probe_endpoint(endpoint, timeout)
    return _HUB_STATUS[endpoint]


def _probe_endpoint(endpoint: str, timeout: float) -> Optional[str]:
    import threading
    import urllib.error
    import urllib.request

    answer: list = []

    def head():
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
            answer.append(None)
        except urllib.error.HTTPError:  # an HTTP status is an answer
            answer.append(None)
        except Exception as e:  # noqa: BLE001 - refused, unresolvable, timed out, bad URL: not reachable
            cause = getattr(e, "reason", None) or e
            answer.append(f"no answer from {endpoint} ({type(e).__name__}: {_one_line(cause)})")

    thread = threading.Thread(target=head, name="hub-reachability", daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return answer[0] if answer else f"no answer from {endpoint} within {timeout:g} s"


@contextmanager
def _hub_client_offline(offline: bool):
    """``huggingface_hub.constants.HF_HUB_OFFLINE`` set for the block when ``offline`` (restored after): every Hub
    request in it then fails at once (``OfflineModeIsEnabled``) and files come from the cache."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = saved or offline
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def load_image_encoder(
    name_or_path: str = DEFAULT_IMAGE_ENCODER,
    device: Optional[Union[str, torch.device]] = None,
    torch_dtype: Optional[torch.dtype] = None,
    pooling: str = "auto",
    batch_size: int = 64,
    cache_dir: Optional[str] = None,
    revision: Optional[str] = None,
    local_files_only: bool = False,
) -> PretrainedImageEncoder:
    """Load any ``transformers`` image encoder by Hub id or local folder as a feature extractor.

    ``AutoModel.from_pretrained`` + ``AutoImageProcessor.from_pretrained`` (both from ``name_or_path``). A Hub id is
    read from the Hugging Face cache alone when the Hub cannot be used (:func:`hub_offline_reason`:
    ``HF_HUB_OFFLINE=1``, or no answer within a few seconds), so a missing encoder fails at once instead of after the
    Hub client's retries. The default, :data:`DEFAULT_IMAGE_ENCODER`, gives FD_DINOv2.

    Args:
        name_or_path: Hub id (e.g. ``"facebook/dinov2-base"``, ``"facebook/dinov2-large"``) or a local folder with
            the model and ``preprocessor_config.json``.
        device: where the model runs (default :func:`default_device`).
        torch_dtype: model dtype (default float32; features are returned as float32 either way).
        pooling: see :class:`PretrainedImageEncoder`.
        batch_size: images per forward pass.
        cache_dir, revision, local_files_only: passed to both ``from_pretrained`` calls.

    Returns:
        :class:`PretrainedImageEncoder` in eval mode on ``device``.

    Raises:
        EncoderUnavailableError: (a ``ValueError``) in one line: not a folder and not a Hub id; not cached while the
            Hub cannot be used; or any failure to load.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    from transformers import AutoImageProcessor, AutoModel

    name = str(name_or_path)
    what = (f"a Hub id such as {DEFAULT_IMAGE_ENCODER!r} or a local folder with config.json, the weights and "
            f"preprocessor_config.json")
    offline = None
    if not os.path.isdir(name):
        try:
            validate_repo_id(name)
        except HFValidationError:
            raise EncoderUnavailableError(f"the image encoder {name!r} is no folder and no Hub id (need {what})",
                                          "no such folder, and not a Hub id") from None
        offline = None if local_files_only else hub_offline_reason()
    kwargs = {"cache_dir": cache_dir, "revision": revision, "local_files_only": local_files_only or bool(offline)}
    try:
        # Offline decided: the Hub client is put offline for the load as well, since transformers' look-up of a
        # PEFT adapter (adapter_config.json) ignores local_files_only and would retry the Hub (measured: 23 s).
        with _hub_client_offline(bool(offline)):
            processor = AutoImageProcessor.from_pretrained(name_or_path, **kwargs)
            model = AutoModel.from_pretrained(name_or_path, dtype=torch_dtype or torch.float32, **kwargs)
    except (OSError, ValueError) as e:
        if offline:
            cause = (f"not in the Hugging Face cache ({cache_dir or constants.HF_HUB_CACHE}), and the Hub is not "
                     f"used: {offline}")
            raise EncoderUnavailableError(
                f"the image encoder {name!r} is {cause}; pass a local folder of a transformers image encoder, or "
                f"download it once where the Hub can be reached", cause) from e
        cause = f"{type(e).__name__}: {_one_line(e)}"
        raise EncoderUnavailableError(f"could not load the image encoder {name!r} with transformers' AutoModel and "
                                      f"AutoImageProcessor ({what}): {cause}", cause) from e
    model = model.to(torch.device(device) if device is not None else default_device())
    return PretrainedImageEncoder(model, processor, name=str(name_or_path), pooling=pooling, batch_size=batch_size)



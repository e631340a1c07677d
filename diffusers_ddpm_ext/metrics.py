"""Sample-quality metrics: distances between feature sets and the feature extractors that feed them.

* :func:`frechet_distance` - Fréchet distance between Gaussians fitted to two feature sets (the formula of
  FID, Heusel et al. 2017), computed in float64 through symmetric eigendecompositions so that singular or
  near-singular covariances (fewer samples than feature dimensions, dead ReLU units) are handled.
* :func:`kernel_distance` - KID (Bińkowski et al. 2018): the unbiased estimator of MMD² with the cubic
  polynomial kernel ``k(x, y) = (x·y / d + 1)^3``, averaged over random subsets; ``(mean, std)``.
* :func:`precision_recall` - improved precision and recall (Kynkäänniemi et al. 2019): each set's manifold
  is the union of balls reaching each point's k-th nearest neighbour in that set.
* :func:`load_digits_classifier` - the default feature extractor for the built-in digits: a small CNN
  trained on the digits training split (seeded, seconds on CPU), cached as safetensors together with its
  held-out accuracy. Calling it gives penultimate-layer features; ``predict`` gives class probabilities,
  from which :func:`class_coverage` computes mode coverage.
* :func:`load_image_encoder` - any pretrained ``transformers`` image encoder (``AutoModel`` +
  ``AutoImageProcessor``, by Hub id or local folder) as a feature extractor, preprocessing exactly as its
  image processor says; the default ``facebook/dinov2-base`` with CLS-token features gives FD_DINOv2 (Stein et
  al., NeurIPS 2023), the recommended replacement of Inception-FID for data other than the digits.
* :func:`sample_quality` - all of the above in one dict, with the sample counts beside the figures.

FD is biased upward at small N (the bias shrinks like 1/N): compare FDs only at equal N, and state N.

Any callable ``images -> features`` is a feature extractor (:class:`FeatureExtractor`), so the standard
Inception features plug in when their weights are available, e.g. with ``pytorch-fid``::

    from pytorch_fid.inception import InceptionV3
    net = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()

    def inception(images):                       # (B, C, H, W) in [-1, 1]
        x = (images.clamp(-1, 1) + 1) / 2         # pytorch-fid expects [0, 1] and resizes to 299 itself
        x = x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x
        return net(x)[0].flatten(1)               # (B, 2048)

    sample_quality(generated, reference, extractor=inception)   # "fd" is then the usual FID

or with ``torch-fidelity``'s ``FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])`` fed with
``((images + 1) * 127.5).round().to(torch.uint8)`` (3 channels). FID needs thousands of samples to be
comparable with published numbers; with a few hundred samples report it only relative to a baseline
computed with the same sample counts.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.utils import BaseOutput

ArrayLike = Union[np.ndarray, torch.Tensor]

CACHE_ENV = "DIFFUSERS_DDPM_EXT_CACHE"
"""Environment variable overriding the cache folder of the digits classifier."""


class FeatureExtractor(Protocol):
    """Anything mapping ``(B, C, H, W)`` images in ``[-1, 1]`` to ``(B, D)`` features (tensor or array).

    An extractor that also has ``predict(images) -> (B, K)`` class probabilities additionally gets the
    mode-coverage figures in :func:`sample_quality`.
    """

    def __call__(self, images: torch.Tensor) -> ArrayLike: ...


# ----------------------------------------------------------------------------------------------------
# Distances between feature sets
# ----------------------------------------------------------------------------------------------------


@dataclass
class FrechetDistanceOutput(BaseOutput):
    """Args: distance: the Fréchet distance; n_a, n_b: samples in each set; feature_dim: D."""

    distance: float
    n_a: int
    n_b: int
    feature_dim: int


@dataclass
class KernelDistanceOutput(BaseOutput):
    """Args: mean, std: KID over the subsets; n_a, n_b: samples; num_subsets, subset_size: the subsets used."""

    mean: float
    std: float
    n_a: int
    n_b: int
    num_subsets: int
    subset_size: int


@dataclass
class PrecisionRecallOutput(BaseOutput):
    """Args: precision, recall: fractions in [0, 1]; n_real, n_fake: samples; k: the neighbour rank."""

    precision: float
    recall: float
    n_real: int
    n_fake: int
    k: int


def _as_features(x: ArrayLike, name: str, min_rows: int = 2) -> np.ndarray:
    a = x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name} must have shape (N, D), got {a.shape}")
    if a.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} samples, got {a.shape[0]}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or inf")
    return a


def _small_blas(work: float):
    """One BLAS thread for small products: OpenBLAS threads spin-wait, and on a busy CPU a 200x200 product
    with two threads ran ~30x slower than with one (measured on the 2-core target)."""
    if work >= 2**26:
        return nullcontext()
    try:
        from threadpoolctl import threadpool_limits  # a scikit-learn dependency
    except ImportError:
        return nullcontext()
    return threadpool_limits(1, "blas")


def _sqrtm_psd(c: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((c + c.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance_from_statistics(mu_a: ArrayLike, cov_a: ArrayLike, mu_b: ArrayLike, cov_b: ArrayLike) -> float:
    """Fréchet distance between ``N(μa, Σa)`` and ``N(μb, Σb)`` (Dowson & Landau 1982)::

        ||μa − μb||² + tr Σa + tr Σb − 2 tr (Σa^½ Σb Σa^½)^½

    The trace term equals ``tr (Σa Σb)^½`` used by FID but is computed from the symmetric PSD matrix
    ``Σa^½ Σb Σa^½``, whose eigenvalues are real and clipped at 0; no complex ``sqrtm`` residue, no
    ``eps`` added to the diagonal. Float64 throughout; the result is clipped at 0.

    Args:
        mu_a, mu_b: ``(D,)`` means.
        cov_a, cov_b: ``(D, D)`` covariances (symmetric positive semi-definite).
    """
    mu_a, mu_b = np.atleast_1d(np.asarray(mu_a, np.float64)), np.atleast_1d(np.asarray(mu_b, np.float64))
    cov_a, cov_b = np.atleast_2d(np.asarray(cov_a, np.float64)), np.atleast_2d(np.asarray(cov_b, np.float64))
    d = len(mu_a)
    if mu_b.shape != (d,) or cov_a.shape != (d, d) or cov_b.shape != (d, d):
        raise ValueError(f"statistics do not match: means {mu_a.shape}, {mu_b.shape}, covariances {cov_a.shape}, "
                         f"{cov_b.shape}")
    with _small_blas(d**3):
        root_a = _sqrtm_psd(cov_a)
        m = root_a @ cov_b @ root_a
        cross = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return max(float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross), 0.0)


def _mean_cov(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with _small_blas(len(x) * x.shape[1] ** 2):
        return x.mean(0), np.atleast_2d(np.cov(x, rowvar=False, ddof=1))


def frechet_distance(features_a: ArrayLike, features_b: ArrayLike) -> FrechetDistanceOutput:
    """Fréchet distance between Gaussians fitted to two feature sets (the formula of FID, Heusel et al. 2017).

    Means and unbiased (``ddof=1``) covariances go to :func:`frechet_distance_from_statistics`.

    Args:
        features_a: ``(N_a, D)`` features.
        features_b: ``(N_b, D)`` features.

    Returns:
        :class:`FrechetDistanceOutput` with the distance and the sample counts.
    """
    a, b = _as_features(features_a, "features_a"), _as_features(features_b, "features_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    d = frechet_distance_from_statistics(*_mean_cov(a), *_mean_cov(b))
    return FrechetDistanceOutput(distance=d, n_a=len(a), n_b=len(b), feature_dim=a.shape[1])


def frechet_distance_standard_error(features_a: ArrayLike, features_b: ArrayLike, num_resamples: int = 20,
                                    seed: int = 0) -> float:
    """Bootstrap standard error of :func:`frechet_distance`: the standard deviation of the distance over
    ``num_resamples`` resamplings (with replacement) of both sets (Efron & Tibshirani 1993, ch. 6).

    It measures the sampling noise at these N; it says nothing about FD's bias at small N, which is why FDs are
    compared only at equal N.
    """
    a, b = _as_features(features_a, "features_a"), _as_features(features_b, "features_b")
    if num_resamples < 2:
        raise ValueError(f"num_resamples must be >= 2, got {num_resamples}")
    rng = np.random.default_rng(seed)
    values = [frechet_distance(a[rng.integers(0, len(a), len(a))], b[rng.integers(0, len(b), len(b))]).distance
              for _ in range(num_resamples)]
    return float(np.std(values, ddof=1))


def _cubic_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² with the cubic polynomial kernel (Gretton et al. 2012, eq. 3; equal set sizes not needed)."""
    m, n = len(x), len(y)
    kxx, kyy, kxy = _cubic_kernel(x, x), _cubic_kernel(y, y), _cubic_kernel(x, y)
    # Diagonal terms k(x_i, x_i) are excluded: they are what makes the plug-in (V-statistic) estimate biased up.
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())


def kernel_distance(
    features_a: ArrayLike,
    features_b: ArrayLike,
    num_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> KernelDistanceOutput:
    """Kernel Inception Distance on any features (Bińkowski et al. 2018).

    Draws ``num_subsets`` pairs of subsets (without replacement inside a subset) of
    ``min(subset_size, N_a, N_b)`` samples and returns the mean and standard deviation of the unbiased
    MMD² over them. Unbiased: for two samples of one distribution the mean is 0 in expectation (and may be
    negative).

    Args:
        features_a: ``(N_a, D)`` features.
        features_b: ``(N_b, D)`` features.
        num_subsets: number of subset pairs.
        subset_size: requested subset size (capped by the set sizes).
        seed: seed of the subset draws.

    Returns:
        :class:`KernelDistanceOutput` (``mean``, ``std``, counts and the subset size actually used).
    """
    a, b = _as_features(features_a, "features_a"), _as_features(features_b, "features_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    if num_subsets < 1 or subset_size < 2:
        raise ValueError(f"need num_subsets >= 1 and subset_size >= 2, got {num_subsets}, {subset_size}")
    m = min(subset_size, len(a), len(b))
    rng = np.random.default_rng(seed)
    with _small_blas(m * m * a.shape[1]):
        values = np.array([
            mmd2_unbiased(a[rng.choice(len(a), m, replace=False)], b[rng.choice(len(b), m, replace=False)])
            for _ in range(num_subsets)
        ])
    std = float(values.std(ddof=1)) if num_subsets > 1 else 0.0
    return KernelDistanceOutput(mean=float(values.mean()), std=std, n_a=len(a), n_b=len(b),
                                num_subsets=num_subsets, subset_size=m)


def _pairwise_distances(x: torch.Tensor, y: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    return torch.cat([torch.cdist(x[i:i + chunk], y) for i in range(0, len(x), chunk)])  # (N_x, N_y)


def _knn_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    d = _pairwise_distances(x, x)
    # k + 1 smallest including the point itself (distance 0) -> the k-th neighbour among the others.
    return d.topk(k + 1, dim=1, largest=False).values[:, k]  # (N,)


def _inside_manifold(points: torch.Tensor, support: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    return (_pairwise_distances(points, support) <= radii[None, :]).any(dim=1)  # (N_points,)


def precision_recall(real_features: ArrayLike, fake_features: ArrayLike, k: int = 3) -> PrecisionRecallOutput:
    """Improved precision and recall (Kynkäänniemi et al. 2019).

    precision = fraction of fake samples inside the real manifold; recall = fraction of real samples inside
    the fake manifold, where a set's manifold is ``∪_i Ball(x_i, ||x_i − NN_k(x_i)||)``.

    Args:
        real_features: ``(N_r, D)`` features of real data.
        fake_features: ``(N_f, D)`` features of generated data.
        k: neighbour rank of the radii (paper: 3); both sets need more than ``k`` samples.

    Returns:
        :class:`PrecisionRecallOutput`.
    """
    real = torch.from_numpy(_as_features(real_features, "real_features", k + 1))
    fake = torch.from_numpy(_as_features(fake_features, "fake_features", k + 1))
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dimensions differ: {real.shape[1]} vs {fake.shape[1]}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    precision = _inside_manifold(fake, real, _knn_radii(real, k)).double().mean().item()
    recall = _inside_manifold(real, fake, _knn_radii(fake, k)).double().mean().item()
    return PrecisionRecallOutput(precision=precision, recall=recall, n_real=len(real), n_fake=len(fake), k=k)


def class_coverage(probs: ArrayLike, min_share: float = 0.1) -> dict:
    """Mode coverage from predicted class probabilities of generated samples.

    A class counts as covered when at least ``max(1, ceil(min_share * N / K))`` samples are assigned to
    it by argmax, i.e. ``min_share`` of its share under a uniform class distribution (so one stray
    prediction among many samples does not count as a mode).

    Args:
        probs: ``(N, K)`` class probabilities.
        min_share: fraction of the uniform share needed to count a class.

    Returns:
        dict with ``mode_coverage`` (fraction of the K classes covered), ``class_histogram`` (argmax
        frequencies), ``class_kl_uniform`` (KL(histogram || uniform) in nats, 0 when balanced, log K when
        one class), ``class_tv_uniform`` (total variation to uniform) and ``n``.
    """
    p = probs.detach().cpu().numpy() if isinstance(probs, torch.Tensor) else np.asarray(probs)
    if p.ndim != 2 or len(p) == 0:
        raise ValueError(f"probs must have shape (N, K) with N >= 1, got {p.shape}")
    n, num_classes = p.shape
    counts = np.bincount(p.argmax(1), minlength=num_classes)
    hist = counts / n
    threshold = max(1, math.ceil(min_share * n / num_classes))
    nz = hist > 0
    return {
        "mode_coverage": float((counts >= threshold).mean()),
        "class_histogram": hist.tolist(),
        "class_kl_uniform": float((hist[nz] * np.log(hist[nz] * num_classes)).sum()),
        "class_tv_uniform": float(0.5 * np.abs(hist - 1.0 / num_classes).sum()),
        "n": int(n),
    }


# ----------------------------------------------------------------------------------------------------
# The default extractor for the built-in digits
# ----------------------------------------------------------------------------------------------------


_CLASSIFIER_VERSION = 3
_DEFAULT_TRAIN = {"epochs": 20, "batch_size": 64, "lr": 2e-3, "feature_dim": 64}


def _to_digit_input(images: ArrayLike) -> torch.Tensor:
    """``(B, C, H, W)`` or ``(B, H, W)`` in [-1, 1], any size, grey or RGB -> ``(B, 1, 8, 8)`` float32."""
    x = torch.as_tensor(images).float()
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape (B, 1 or 3, H, W), got {tuple(x.shape)}")
    x = x.clamp(-1, 1).mean(1, keepdim=True)  # RGB -> grey (the digits are grey)
    h, w = x.shape[-2:]
    if (h, w) != (8, 8):
        if h % 8 == 0 and w % 8 == 0:
            x = F.avg_pool2d(x, (h // 8, w // 8))  # area average: exactly undoes a nearest upsample
        else:
            x = F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False, antialias=True)
    return x  # (B, 1, 8, 8)


class DigitsClassifier(nn.Module):
    """Small CNN on 8x8 digits; ``self(images)`` returns the penultimate ``(B, feature_dim)`` features.

    Inputs are images in ``[-1, 1]`` of shape ``(B, 1 or 3, H, W)``; they are averaged to grey and resized
    to 8x8 (area average for multiples of 8, bilinear otherwise).

    Attributes:
        heldout_accuracy: accuracy on the 300 held-out digits, recorded at training time.
    """

    def __init__(self, feature_dim: int = 64, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # 8 -> 4
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)
        # Set after training so features of real digits have unit root-mean-square: keeps the cubic KID
        # kernel and the FD in a readable range (raw ReLU features reach the tens).
        self.register_buffer("feature_scale", torch.ones(()))
        self.heldout_accuracy: Optional[float] = None
        self.metadata: dict = {}

    def forward(self, images: ArrayLike) -> torch.Tensor:
        return self.body(_to_digit_input(images).to(self.head.weight.device)) * self.feature_scale  # (B, D)

    def logits(self, images: ArrayLike) -> torch.Tensor:
        return self.head(self(images) / self.feature_scale)  # (B, K)

    def features(self, images: ArrayLike) -> torch.Tensor:
        """Penultimate-layer features, ``(B, feature_dim)``."""
        return self(images)

    @torch.no_grad()
    def predict(self, images: ArrayLike) -> torch.Tensor:
        """Class probabilities, ``(B, 10)``."""
        return self.logits(images).softmax(-1)


def default_cache_dir() -> str:
    """``$DIFFUSERS_DDPM_EXT_CACHE``, else ``$XDG_CACHE_HOME/diffusers_ddpm_ext``, else ``~/.cache/diffusers_ddpm_ext``."""
    if os.environ.get(CACHE_ENV):
        return os.environ[CACHE_ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "diffusers_ddpm_ext")


def train_digits_classifier(seed: int = 0, epochs: int = 20, batch_size: int = 64, lr: float = 2e-3,
                            feature_dim: int = 64) -> DigitsClassifier:
    """Train the classifier on the digits training split; deterministic for a seed on CPU.

    The global RNG is left untouched (initialisation runs inside ``torch.random.fork_rng``).

    Returns:
        The classifier in eval mode with ``heldout_accuracy`` set.
    """
    from diffusers_ddpm_ext.data import load_digits_tensors

    x_train, y_train = load_digits_tensors("train", 8, 1)
    x_test, y_test = load_digits_tensors("heldout", 8, 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsClassifier(feature_dim)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    # One thread: the same bits on any machine (reductions split across threads can round differently), and
    # for a model this small threads only add overhead, worst of all on a shared CPU.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _fit(model, opt, x_train, y_train, epochs, batch_size, g)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    with torch.no_grad():
        model.feature_scale.fill_(1.0 / model(x_train).pow(2).mean().sqrt().item())
        model.heldout_accuracy = float((model.logits(x_test).argmax(1) == y_test).double().mean())
    return model


def _fit(model, opt, x_train, y_train, epochs, batch_size, g):
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x_train), generator=g)
        for i in range(0, len(perm), batch_size):
            idx = perm[i:i + batch_size]
            # One-pixel random shifts make the features less brittle on generated samples.
            shift = torch.randint(-1, 2, (2,), generator=g).tolist()
            xb = torch.roll(x_train[idx], shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(model.logits(xb), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()


_MEMO: dict = {}


def load_digits_classifier(seed: int = 0, cache_dir: Optional[str] = None, retrain: bool = False) -> DigitsClassifier:
    """The default digits feature extractor, trained once and cached as safetensors.

    The file ``digits_classifier_v{version}_{hash}.safetensors`` in ``cache_dir`` (default
    :func:`default_cache_dir`) holds the weights and, in its metadata, the training config and held-out
    accuracy. An unreadable or mismatching file is retrained (with a warning) and replaced atomically.

    Args:
        seed: training seed.
        cache_dir: cache folder.
        retrain: ignore the cache.

    Returns:
        :class:`DigitsClassifier` in eval mode on CPU, ``heldout_accuracy`` set.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    config = dict(_DEFAULT_TRAIN, seed=seed, version=_CLASSIFIER_VERSION)
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    cache_dir = cache_dir or default_cache_dir()
    path = os.path.join(cache_dir, f"digits_classifier_v{_CLASSIFIER_VERSION}_{key}.safetensors")
    if not retrain and path in _MEMO:
        return _MEMO[path]
    model = None
    if not retrain and os.path.isfile(path):
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
            if json.loads(meta.get("config", "{}")) != config:
                raise ValueError("config in the file does not match")
            model = DigitsClassifier(config["feature_dim"])
            model.load_state_dict(state)
            model.heldout_accuracy = float(meta["heldout_accuracy"])
        except Exception as e:
            warnings.warn(f"cached digits classifier {path} is unusable ({type(e).__name__}: {e}); retraining")
            model = None
    if model is None:
        model = train_digits_classifier(seed, **{k: config[k] for k in _DEFAULT_TRAIN})
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        meta = {"config": json.dumps(config, sort_keys=True), "heldout_accuracy": repr(model.heldout_accuracy)}
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp, metadata=meta)
        os.replace(tmp, path)  # atomic: concurrent processes never read a half-written file
    model.eval().requires_grad_(False)
    model.metadata = {"path": path, **config}
    _MEMO[path] = model
    return model


# ----------------------------------------------------------------------------------------------------
# A pretrained image encoder through transformers (FD_DINOv2 and friends)
# ----------------------------------------------------------------------------------------------------


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

    ``AutoModel.from_pretrained`` + ``AutoImageProcessor.from_pretrained`` (both from ``name_or_path``; offline
    use works from the Hugging Face cache with ``HF_HUB_OFFLINE=1``). The default, :data:`DEFAULT_IMAGE_ENCODER`,
    gives FD_DINOv2.

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
    """
    from transformers import AutoImageProcessor, AutoModel

    kwargs = {"cache_dir": cache_dir, "revision": revision, "local_files_only": local_files_only}
    try:
        processor = AutoImageProcessor.from_pretrained(name_or_path, **kwargs)
        model = AutoModel.from_pretrained(name_or_path, dtype=torch_dtype or torch.float32, **kwargs)
    except (OSError, ValueError) as e:
        raise ValueError(f"could not load the image encoder {name_or_path!r} with transformers' AutoModel and "
                         f"AutoImageProcessor (a Hub id such as {DEFAULT_IMAGE_ENCODER!r} or a local folder with "
                         f"config.json, the weights and preprocessor_config.json): {type(e).__name__}: {e}") from e
    model = model.to(torch.device(device) if device is not None else default_device())
    return PretrainedImageEncoder(model, processor, name=str(name_or_path), pooling=pooling, batch_size=batch_size)


# ----------------------------------------------------------------------------------------------------
# One call for a report
# ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def extract_features(extractor: Callable, images: ArrayLike, batch_size: int = 500, progress: bool = False,
                     desc: str = "features") -> np.ndarray:
    """Run ``extractor`` over ``images`` in batches (with a tqdm bar if ``progress``); returns ``(N, D)`` float64."""
    from tqdm.auto import tqdm

    x = torch.as_tensor(images)
    out = []
    for i in tqdm(range(0, len(x), batch_size), desc=desc, disable=not progress, leave=False):
        f = extractor(x[i:i + batch_size])
        f = f.detach().cpu().double().numpy() if isinstance(f, torch.Tensor) else np.asarray(f, np.float64)
        out.append(f.reshape(len(f), -1))
    return np.concatenate(out)


@torch.no_grad()
def _predict(extractor, images: ArrayLike, batch_size: int = 500) -> np.ndarray:
    x = torch.as_tensor(images)
    return np.concatenate([np.asarray(torch.as_tensor(extractor.predict(x[i:i + batch_size])).cpu().double())
                           for i in range(0, len(x), batch_size)])


def sample_quality(
    generated: ArrayLike,
    reference: ArrayLike,
    extractor: Optional[FeatureExtractor] = None,
    *,
    kid_num_subsets: int = 100,
    kid_subset_size: Optional[int] = None,
    k: int = 3,
    seed: int = 0,
    batch_size: int = 500,
    reference_features: Optional[ArrayLike] = None,
    fd_bootstrap: int = 0,
    progress: bool = False,
) -> dict:
    """Fréchet distance, KID, precision/recall (and mode coverage) of generated vs reference images.

    Args:
        generated: ``(N_g, C, H, W)`` generated images in ``[-1, 1]``.
        reference: ``(N_r, C, H, W)`` real images in ``[-1, 1]`` (e.g. the held-out digits).
        extractor: callable images -> features; default the digits classifier
            (:func:`load_digits_classifier`); for other data a :func:`load_image_encoder` encoder. If it has
            ``predict``, mode coverage is reported.
        kid_num_subsets: KID subsets.
        kid_subset_size: KID subset size; default ``min(1000, min(N_g, N_r) // 2)`` so that the subsets
            differ and ``kid_std`` says something (subsets as large as the sets would all be equal).
        k: neighbour rank of precision/recall.
        seed: seed of the KID subsets and of the bootstrap.
        batch_size: feature-extraction batch size.
        reference_features: the reference's features if already computed (e.g. once for several generated sets).
        fd_bootstrap: resamples for ``fd_standard_error`` (:func:`frechet_distance_standard_error`); 0 skips it.
        progress: show a progress bar while extracting features.

    Returns:
        dict with ``fd``, ``fd_standard_error`` (bootstrap, ``None`` without ``fd_bootstrap``), ``kid_mean``,
        ``kid_std`` (spread over the KID subsets), ``precision``, ``recall``, ``precision_standard_error``,
        ``recall_standard_error`` (binomial, ``sqrt(p (1 - p) / N)`` at fixed manifolds), ``mode_coverage``,
        ``class_kl_uniform``, ``class_tv_uniform``, ``class_histogram``, ``reference_mode_coverage`` (the
        coverage figures are ``None`` without ``predict``), ``n_generated``, ``n_reference``,
        ``feature_dim``, ``kid_subset_size``, ``kid_num_subsets``, ``pr_k``, ``fd_bootstrap``, ``extractor``
        (its ``name`` or class name) and ``extractor_heldout_accuracy``.
    """
    if extractor is None:
        extractor = load_digits_classifier()
    if isinstance(extractor, nn.Module):
        extractor.eval()
    fg = extract_features(extractor, generated, batch_size, progress, "features (generated)")
    if reference_features is None:
        fr = extract_features(extractor, reference, batch_size, progress, "features (reference)")
    else:
        fr = _as_features(reference_features, "reference_features")
    if kid_subset_size is None:
        kid_subset_size = max(2, min(1000, min(len(fg), len(fr)) // 2))
    fd = frechet_distance(fg, fr)
    kid = kernel_distance(fg, fr, kid_num_subsets, kid_subset_size, seed)
    pr = precision_recall(fr, fg, k)
    out = {
        "fd": fd.distance,
        "fd_standard_error": frechet_distance_standard_error(fg, fr, fd_bootstrap, seed) if fd_bootstrap else None,
        "kid_mean": kid.mean,
        "kid_std": kid.std,
        "precision": pr.precision,
        "recall": pr.recall,
        "precision_standard_error": math.sqrt(pr.precision * (1 - pr.precision) / pr.n_fake),
        "recall_standard_error": math.sqrt(pr.recall * (1 - pr.recall) / pr.n_real),
        "mode_coverage": None,
        "class_kl_uniform": None,
        "class_tv_uniform": None,
        "class_histogram": None,
        "reference_mode_coverage": None,
        "n_generated": len(fg),
        "n_reference": len(fr),
        "feature_dim": fd.feature_dim,
        "kid_subset_size": kid.subset_size,
        "kid_num_subsets": kid.num_subsets,
        "pr_k": k,
        "fd_bootstrap": int(fd_bootstrap),
        "extractor": getattr(extractor, "name", None) or getattr(extractor, "__name__", type(extractor).__name__),
        "extractor_heldout_accuracy": getattr(extractor, "heldout_accuracy", None),
    }
    if callable(getattr(extractor, "predict", None)):
        cov = class_coverage(_predict(extractor, generated, batch_size))
        out.update({k_: cov[k_] for k_ in ("mode_coverage", "class_kl_uniform", "class_tv_uniform", "class_histogram")})
        out["reference_mode_coverage"] = class_coverage(_predict(extractor, reference, batch_size))["mode_coverage"]
    return out

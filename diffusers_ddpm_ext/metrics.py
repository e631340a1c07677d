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
  al., NeurIPS 2023), the recommended replacement of Inception-FID for data other than the digits. It lives in
  :mod:`diffusers_ddpm_ext.encoders` with :func:`hub_offline_reason` and is re-exported here.
* :func:`sample_quality` - all of the above in one dict, with the sample counts beside the figures.
* :func:`sliced_wasserstein_figures` - the weight-free figure: multi-scale sliced Wasserstein distance
  (:mod:`diffusers_ddpm_ext.swd`, Karras et al. 2018) per pyramid level and averaged, ± bootstrap standard errors,
  as report keys; :func:`swd_real_data_floor` - the same figure for N real training images against the held-out
  split, what "as good as real" reads at that N (computed once per data set and N in a process).
* :func:`hub_offline_reason` - whether the Hugging Face Hub can be used, decided once per process
  (``HF_HUB_OFFLINE``, else one short request to the endpoint), so that an encoder that is not cached fails at once
  instead of after the Hub client's retries (:mod:`diffusers_ddpm_ext.encoders`).

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
# Pretrained image encoders (FD_DINOv2 and friends): diffusers_ddpm_ext.encoders
# ----------------------------------------------------------------------------------------------------

from .encoders import (DEFAULT_IMAGE_ENCODER, HUB_CHECK_TIMEOUT_S, POOLINGS,  # noqa: E402,F401  (public names here)
                       EncoderUnavailableError, PretrainedImageEncoder, default_device, hub_offline_reason,
                       images_to_uint8, load_image_encoder)


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


# ----------------------------------------------------------------------------------------------------
# The weight-free figure: sliced Wasserstein distance, and its real-data floor
# ----------------------------------------------------------------------------------------------------


SWD_SETTINGS = {"num_descriptors": 128, "num_directions": 512, "num_repeats": 4, "num_bootstrap": 20}
"""The SWD settings of every report (``sliced_wasserstein_distance``'s defaults: the paper's 128 neighbourhoods and
512 directions, 4 draws, 20 bootstrap resamples for the standard errors); each report's ``swd_method`` states them.
Fewer make it cheaper and noisier (the tests)."""
SWD_FLOOR_SEED = 0
"""Seed of the training images drawn for :func:`swd_real_data_floor` and of their SWD: fixed, so that the floor
depends on the data set and N only (not on a run's seed)."""
_FLOOR_MEMO: dict = {}


def sliced_wasserstein_figures(generated: ArrayLike, reference: ArrayLike, *, seed: int = 0,
                               num_bootstrap: Optional[int] = None) -> dict:
    """Multi-scale sliced Wasserstein distance (:func:`diffusers_ddpm_ext.swd.sliced_wasserstein_distance` with
    :data:`SWD_SETTINGS`: 128 neighbourhoods per image and level, 4 x 512 directions) as report keys.

    Needs no weights: any images of at least 8 px, grey or RGB, ``(N, C, H, W)`` in ``[-1, 1]`` (quantised to 8 bits
    as saved images are). Biased upward at small N like FD: compare at equal N, beside :func:`swd_real_data_floor`.

    Returns:
        dict with ``swd`` (×10³, mean over the pyramid levels) and ``swd_standard_error`` (bootstrap over images),
        ``swd_<px>`` and ``swd_<px>_standard_error`` per level (finest first), ``swd_resolutions``,
        ``n_generated``, ``n_reference``, ``swd_num_bootstrap`` and ``swd_method``.
    """
    from .swd import sliced_wasserstein_distance

    settings = dict(SWD_SETTINGS)
    if num_bootstrap is not None:
        settings["num_bootstrap"] = num_bootstrap
    out = sliced_wasserstein_distance(generated, reference, seed=seed, **settings)
    figures = out.as_dict()
    figures["swd_resolutions"] = list(out.resolutions)
    return figures


def floor_indices(num_available: int, num_images: int, seed: int = SWD_FLOOR_SEED) -> list:
    """Which training images make the real-data floor: the first ``num_images`` of a seeded permutation of
    ``range(num_available)``; all of them, in order, when there are not more (so a subset passed again is kept)."""
    if int(num_images) >= int(num_available):
        return list(range(int(num_available)))
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(int(num_available), generator=g)[:int(num_images)].tolist()


def _digest(images: ArrayLike) -> tuple:
    x = torch.as_tensor(images).detach().float().cpu()
    pixels = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).contiguous().numpy()
    return tuple(x.shape), hashlib.sha1(pixels.tobytes()).hexdigest()


def swd_real_data_floor(real_images: ArrayLike, reference: ArrayLike, *, seed: int = SWD_FLOOR_SEED,
                        num_bootstrap: Optional[int] = None, real_split: str = "train",
                        reference_split: Optional[str] = None) -> dict:
    """SWD of real images (N training images, never the reference's) against the held-out reference: the figure a
    model whose samples were real images would get at this N and these settings, i.e. the floor its SWD is read
    against (SWD is biased upward at small N, so a model's figure is never compared with 0).

    Computed once per process for the same images, reference and settings (a later call returns the kept figures).

    Args:
        real_images: ``(N, C, H, W)`` real images in ``[-1, 1]``, N = the generated N (:func:`floor_indices` picks
            them from the training split).
        reference: the held-out images the samples are compared with.
        seed, num_bootstrap: of :func:`sliced_wasserstein_figures`.
        real_split, reference_split: the splits' names, reported.

    Returns:
        The keys of :func:`sliced_wasserstein_figures` with ``n_real`` (N) in place of ``n_generated``, plus
        ``split`` (e.g. ``"train vs validation"``) and ``method``.
    """
    key = (_digest(real_images), _digest(reference), int(seed), num_bootstrap, tuple(sorted(SWD_SETTINGS.items())))
    if key not in _FLOOR_MEMO:
        _FLOOR_MEMO[key] = sliced_wasserstein_figures(real_images, reference, seed=seed, num_bootstrap=num_bootstrap)
    figures = dict(_FLOOR_MEMO[key])
    figures["n_real"] = figures.pop("n_generated")
    figures["split"] = f"{real_split} vs {reference_split}" if reference_split else real_split
    figures["method"] = (f"real-data floor: SWD of {figures['n_real']} real {real_split} images (a seeded random "
                         f"subset, none of them in the reference) against the {figures['n_reference']} reference "
                         f"images, with the samples' settings: what samples as good as real images score at this N")
    return figures

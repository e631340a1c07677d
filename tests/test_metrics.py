"""Sample-quality metrics: closed forms, known answers, the digits classifier."""

import numpy as np
import pytest
import scipy.linalg
import torch

from diffusers_ddpm_ext import metrics as M
from diffusers_ddpm_ext.data import load_digits_tensors, load_heldout_digits


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    # A private cache dir: the test trains the real default classifier instead of reusing ~/.cache.
    M._MEMO.clear()
    return M.load_digits_classifier(seed=0, cache_dir=str(tmp_path_factory.mktemp("clf_cache")))


def _scipy_fd(a, b):
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(ca @ cb).real
    return ((mu_a - mu_b) ** 2).sum() + np.trace(ca + cb - 2 * covmean)


# ---------------------------------------------------------------------------------------------- FD


def test_fd_self_is_zero_and_mean_shift_is_exact():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((400, 12)) @ rng.standard_normal((12, 12))  # correlated features
    out = M.frechet_distance(a, a)
    assert out.distance < 1e-8 and (out.n_a, out.n_b, out.feature_dim) == (400, 400, 12)
    for scale in (0.1, 1.0, 5.0):
        delta = scale * rng.standard_normal(12)
        # Equal covariances: the trace terms cancel, FD = ||Δμ||² exactly.
        assert M.frechet_distance(a, a + delta).distance == pytest.approx((delta**2).sum(), rel=1e-7, abs=1e-8)
    d1 = M.frechet_distance(a, a + 0.5).distance
    d2 = M.frechet_distance(a, a + 1.0).distance
    assert d2 > d1 > 0


def test_fd_matches_scipy_and_gaussian_closed_form():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((600, 6)) @ rng.standard_normal((6, 6))
    b = rng.standard_normal((500, 6)) @ rng.standard_normal((6, 6)) + 0.3
    assert M.frechet_distance(a, b).distance == pytest.approx(_scipy_fd(a, b), rel=1e-6)
    # Diagonal Gaussians: FD = ||μa − μb||² + Σ (σa − σb)² (large samples, loose tolerance).
    sa, sb, mu = np.array([1.0, 2.0, 0.5]), np.array([2.0, 1.0, 0.5]), np.array([1.0, -1.0, 2.0])
    x = rng.standard_normal((200_000, 3)) * sa
    y = rng.standard_normal((200_000, 3)) * sb + mu
    expected = (mu**2).sum() + ((sa - sb) ** 2).sum()
    assert M.frechet_distance(x, y).distance == pytest.approx(expected, rel=0.02)


def test_fd_is_robust_to_singular_covariances():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((20, 64))  # fewer samples than dimensions: rank-deficient covariance
    a[:, 10:20] = 0.0  # dead units
    assert M.frechet_distance(a, a).distance < 1e-8
    delta = np.full(64, 0.25)
    assert M.frechet_distance(a, a + delta).distance == pytest.approx((delta**2).sum(), rel=1e-6)
    b = rng.standard_normal((30, 64))
    d = M.frechet_distance(a, b).distance
    assert np.isfinite(d) and d > 0


def test_fd_rejects_bad_input():
    with pytest.raises(ValueError, match="feature dimensions"):
        M.frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="at least 2"):
        M.frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="NaN"):
        M.frechet_distance(np.full((4, 3), np.nan), np.zeros((5, 3)))


# --------------------------------------------------------------------------------------------- KID


def test_mmd_unbiased_matches_naive_sum():
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((7, 4)), rng.standard_normal((9, 4)) + 0.5
    k = lambda u, v: (u @ v / 4 + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
    yy = sum(k(y[i], y[j]) for i in range(9) for j in range(9) if i != j) / (9 * 8)
    xy = sum(k(x[i], y[j]) for i in range(7) for j in range(9)) / (7 * 9)
    assert M.mmd2_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-10)


def test_kid_is_unbiased_for_one_distribution_and_grows_with_shift():
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((1000, 16)), rng.standard_normal((1000, 16))
    same = M.kernel_distance(a, b, num_subsets=100, subset_size=200, seed=0)
    assert (same.n_a, same.n_b, same.subset_size, same.num_subsets) == (1000, 1000, 200, 100)
    assert abs(same.mean) < same.std  # mean ≈ 0 within one std of the subset estimates
    # The biased (V-statistic) estimate on the same subsets is clearly positive: the diagonal terms matter.
    xs, ys = a[:200], b[:200]
    biased = (M._cubic_kernel(xs, xs).mean() + M._cubic_kernel(ys, ys).mean() - 2 * M._cubic_kernel(xs, ys).mean())
    assert biased > 5 * same.std
    shifted = M.kernel_distance(a, b + 0.5, num_subsets=100, subset_size=200, seed=0)
    assert shifted.mean > same.mean + 5 * shifted.std
    again = M.kernel_distance(a, b, num_subsets=100, subset_size=200, seed=0)
    assert again.mean == same.mean  # seeded subsets


# --------------------------------------------------------------------------------- precision/recall


def _clusters(rng, centers, per_cluster, scale=0.3):
    return np.concatenate([c + scale * rng.standard_normal((per_cluster, centers.shape[1])) for c in centers])


def test_precision_recall_known_answers():
    rng = np.random.default_rng(5)
    angles = 2 * np.pi * np.arange(10) / 10
    centers = 20.0 * np.stack([np.cos(angles), np.sin(angles)], 1)  # 10 well-separated modes in 2-D
    real = _clusters(rng, centers, 60)
    pr = M.precision_recall(real, real.copy(), k=3)
    assert (pr.precision, pr.recall, pr.n_real, pr.n_fake, pr.k) == (1.0, 1.0, 600, 600, 3)
    far = real + 1000.0
    pr = M.precision_recall(real, far, k=3)
    assert (pr.precision, pr.recall) == (0.0, 0.0)
    # Fake data drawn afresh from 5 of the 10 modes: everything it makes is realistic (precision ≈ 1) but it
    # reaches only half of the real data (recall ≈ 0.5).
    # (In 2-D the k-NN balls cover a mode well; in high dimensions their union misses the tails, which is
    # the estimator's known small-sample bias, not what this test is about.)
    half = _clusters(rng, centers[:5], 120)
    pr = M.precision_recall(real, half, k=3)
    assert pr.precision > 0.95
    assert 0.45 < pr.recall <= 0.5
    with pytest.raises(ValueError, match="at least 4"):
        M.precision_recall(real, real[:3], k=3)


def test_class_coverage():
    probs = np.eye(10)[np.repeat(np.arange(10), 20)]  # balanced
    cov = M.class_coverage(probs)
    assert cov["mode_coverage"] == 1.0 and cov["class_kl_uniform"] == pytest.approx(0) and cov["n"] == 200
    one = np.eye(10)[np.zeros(50, dtype=int)]  # mode collapse
    cov = M.class_coverage(one)
    assert cov["mode_coverage"] == 0.1
    assert cov["class_kl_uniform"] == pytest.approx(np.log(10))
    assert cov["class_tv_uniform"] == pytest.approx(0.9)
    # A single stray prediction among 1000 samples does not count as a covered mode.
    labels = np.r_[np.zeros(999, dtype=int), [7]]
    assert M.class_coverage(np.eye(10)[labels])["mode_coverage"] == 0.1


# ----------------------------------------------------------------------------------- the classifier


def test_classifier_accuracy_cache_and_resizing(classifier, tmp_path):
    assert classifier.heldout_accuracy > 0.9
    x, y = load_heldout_digits(resolution=8)
    acc = (classifier.predict(x).argmax(1) == y).double().mean().item()
    assert acc == pytest.approx(classifier.heldout_accuracy)
    # 16x16 nearest upsampling (grey or RGB) gives the same features as the 8x8 originals.
    x16, _ = load_heldout_digits(resolution=16, in_channels=3)
    with torch.no_grad():
        torch.testing.assert_close(classifier(x16), classifier(x))
        assert classifier.features(x).shape == (300, 64)
    probs = classifier.predict(x[:5])
    torch.testing.assert_close(probs.sum(1), torch.ones(5))
    # The cache file is found again (no retraining) and restores the same weights and accuracy.
    path = classifier.metadata["path"]
    M._MEMO.clear()
    again = M.load_digits_classifier(seed=0, cache_dir=str(__import__("os").path.dirname(path)))
    assert again.heldout_accuracy == classifier.heldout_accuracy
    for (k, v), v2 in zip(classifier.state_dict().items(), again.state_dict().values()):
        assert torch.equal(v, v2), k


def test_classifier_training_is_deterministic():
    a = M.train_digits_classifier(seed=3, epochs=1)
    b = M.train_digits_classifier(seed=3, epochs=1)
    c = M.train_digits_classifier(seed=4, epochs=1)
    for v1, v2 in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(v1, v2)
    assert not torch.equal(a.head.weight, c.head.weight)


def test_corrupt_cache_is_retrained(tmp_path, monkeypatch):
    calls = []
    real_train = M.train_digits_classifier

    def fast_train(seed, **kw):
        calls.append(seed)
        return real_train(seed, **dict(kw, epochs=1))

    monkeypatch.setattr(M, "train_digits_classifier", fast_train)
    M._MEMO.clear()
    first = M.load_digits_classifier(seed=7, cache_dir=str(tmp_path))
    path = first.metadata["path"]
    with open(path, "wb") as f:
        f.write(b"not a safetensors file")
    M._MEMO.clear()
    with pytest.warns(UserWarning, match="unusable"):
        second = M.load_digits_classifier(seed=7, cache_dir=str(tmp_path))
    assert calls == [7, 7] and torch.equal(first.head.weight, second.head.weight)
    M._MEMO.clear()


def test_sample_quality_on_digits(classifier):
    x, _ = load_heldout_digits(resolution=16)
    train, _ = load_digits_tensors("train", resolution=16)
    good = M.sample_quality(train[:300], x, extractor=classifier, kid_num_subsets=20)
    noise = M.sample_quality(torch.rand(300, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1, x,
                             extractor=classifier, kid_num_subsets=20)
    for key in ("fd", "kid_mean", "kid_std", "precision", "recall", "mode_coverage", "n_generated", "n_reference"):
        assert key in good
    assert (good["n_generated"], good["n_reference"], good["kid_subset_size"]) == (300, 300, 150)
    assert good["extractor_heldout_accuracy"] == classifier.heldout_accuracy
    assert good["mode_coverage"] == 1.0 and good["reference_mode_coverage"] == 1.0
    assert good["precision"] > 0.8 and good["recall"] > 0.5
    assert noise["fd"] > 10 * good["fd"]
    assert noise["kid_mean"] > good["kid_mean"] + 10 * noise["kid_std"]
    assert noise["precision"] < 0.1
    # A single repeated digit: precision stays high, recall and mode coverage collapse.
    collapsed = M.sample_quality(x[:1].repeat(300, 1, 1, 1) + 0.01 * torch.randn(300, 1, 16, 16), x,
                                 extractor=classifier, kid_num_subsets=20)
    assert collapsed["mode_coverage"] == 0.1 and collapsed["recall"] < 0.05


def test_sample_quality_with_a_plugged_extractor():
    def flat(images):  # any callable images -> features
        return images.flatten(1)[:, :20]

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(100, 1, 8, 8, generator=g), torch.randn(80, 1, 8, 8, generator=g)
    q = M.sample_quality(a, b, extractor=flat, kid_num_subsets=10)
    assert q["mode_coverage"] is None and q["feature_dim"] == 20
    assert (q["n_generated"], q["n_reference"]) == (100, 80)
    assert q["fd"] == pytest.approx(M.frechet_distance(a.flatten(1)[:, :20], b.flatten(1)[:, :20]).distance)

"""Sample-quality metrics: closed forms, known answers, the digits classifier."""

import numpy as np
import pytest
import scipy.linalg
import torch

from diffusers_ddpm_ext import encoders
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


# ------------------------------------------------------------------------- FD closed forms, bootstrap


def _random_spd(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_fd_from_statistics_matches_scipy_and_commuting_closed_form():
    rng = np.random.default_rng(5)
    for d in (1, 3, 16):
        mu_a, mu_b = rng.standard_normal(d), rng.standard_normal(d)
        ca, cb = _random_spd(rng, d), _random_spd(rng, d)
        direct = ((mu_a - mu_b) ** 2).sum() + np.trace(ca + cb - 2 * scipy.linalg.sqrtm(ca @ cb).real)
        assert M.frechet_distance_from_statistics(mu_a, ca, mu_b, cb) == pytest.approx(direct, rel=1e-9, abs=1e-10)
        assert M.frechet_distance_from_statistics(mu_a, ca, mu_a, ca) == pytest.approx(0.0, abs=1e-9)
    # Commuting covariances (same eigenvectors): FD = ||Δμ||² + Σ (√λa − √λb)².
    q, _ = np.linalg.qr(rng.standard_normal((4, 4)))
    la, lb = np.array([1.0, 4.0, 0.25, 9.0]), np.array([4.0, 1.0, 1.0, 0.0])
    expected = 1.0 + ((np.sqrt(la) - np.sqrt(lb)) ** 2).sum()
    got = M.frechet_distance_from_statistics(np.zeros(4), (q * la) @ q.T, np.eye(4)[0], (q * lb) @ q.T)
    # A zero eigenvalue (singular Σb) costs √(rounding error) ≈ 1e-8 in the square root, hence rel=1e-7.
    assert got == pytest.approx(expected, rel=1e-7)
    with pytest.raises(ValueError, match="do not match"):
        M.frechet_distance_from_statistics(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


def test_fd_of_gaussian_samples_converges_to_the_closed_form():
    rng = np.random.default_rng(6)
    d = 5
    ca, cb = _random_spd(rng, d), _random_spd(rng, d)
    mu = rng.standard_normal(d)
    expected = M.frechet_distance_from_statistics(np.zeros(d), ca, mu, cb)
    x = rng.multivariate_normal(np.zeros(d), ca, 100_000)
    y = rng.multivariate_normal(mu, cb, 100_000)
    assert M.frechet_distance(x, y).distance == pytest.approx(expected, rel=0.02)


def test_fd_bootstrap_standard_error_shrinks_with_n():
    rng = np.random.default_rng(7)
    small = M.frechet_distance_standard_error(rng.standard_normal((100, 4)), rng.standard_normal((100, 4)) + 1, 30)
    large = M.frechet_distance_standard_error(rng.standard_normal((2000, 4)), rng.standard_normal((2000, 4)) + 1, 30)
    assert small > 2 * large > 0
    with pytest.raises(ValueError, match="num_resamples"):
        M.frechet_distance_standard_error(np.zeros((5, 2)), np.zeros((5, 2)), 1)


# ------------------------------------------------------------------- pretrained encoder (tiny DINOv2)

ENCODER_REPO = "tiny-org/tiny-dinov2"
ENCODER_SHA = "0123456789abcdef0123456789abcdef01234567"


def save_tiny_dinov2(folder, seed=0):
    """A randomly initialised DINOv2 with tiny sizes plus its image processor, saved like a Hub model."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          image_size=32, patch_size=8)
    Dinov2Model(config).save_pretrained(folder)
    # The preprocessing of facebook/dinov2-base (bicubic resize of the shorter side, center crop, ImageNet
    # normalisation) at a tiny size.
    BitImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}, resample=3,
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)
    return folder


def build_model_cache(folder, cache, repo_id=ENCODER_REPO, sha=ENCODER_SHA):
    """Lay ``folder`` out as huggingface_hub's cache holds a downloaded model repo."""
    import shutil

    root = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, root / "snapshots" / sha)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(sha)
    return cache


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory):
    return save_tiny_dinov2(tmp_path_factory.mktemp("encoders") / "tiny-dinov2")


def _images(n, channels=3, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, channels, size, size, generator=g) * 2 - 1)  # (N, C, H, W) in [-1, 1]


def test_encoder_from_local_folder_gives_the_cls_token(tiny_dinov2):
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel

    enc = M.load_image_encoder(str(tiny_dinov2), device="cpu", batch_size=3)
    x = _images(7)
    feats = enc(x)
    assert feats.shape == (7, 32) and feats.dtype == torch.float32 and enc.device.type == "cpu"
    # By hand: uint8 RGB -> the processor -> the model's CLS token output (= DINOv2's pooler_output).
    model, proc = AutoModel.from_pretrained(str(tiny_dinov2)), AutoImageProcessor.from_pretrained(str(tiny_dinov2))
    u8 = ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    pixels = proc(images=[Image.fromarray(a) for a in u8], return_tensors="pt")["pixel_values"]
    assert pixels.shape == (7, 3, 32, 32)  # shorter side -> 40, center crop 32
    with torch.no_grad():
        out = model(pixel_values=pixels)
    torch.testing.assert_close(feats, out.last_hidden_state[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(feats, out.pooler_output, rtol=1e-5, atol=1e-5)
    assert enc.metadata["model_type"] == "dinov2" and enc.metadata["name"] == str(tiny_dinov2)
    assert enc.metadata["processor"]["crop_size"] == {"height": 32, "width": 32}
    assert M.load_image_encoder(str(tiny_dinov2), pooling="mean")(x).shape == (7, 32)
    with pytest.raises(ValueError, match="pooling must be one of"):
        M.load_image_encoder(str(tiny_dinov2), pooling="max")


def test_encoder_normalises_as_its_processor_says(tiny_dinov2, tmp_path):
    from transformers import BitImageProcessor

    folder = tmp_path / "no_resize"
    import shutil

    shutil.copytree(tiny_dinov2, folder)
    BitImageProcessor(do_resize=False, do_center_crop=False, image_mean=[0.5, 0.25, 0.1],
                      image_std=[0.5, 0.2, 0.3]).save_pretrained(folder)
    enc = M.load_image_encoder(str(folder), device="cpu")
    x = _images(2, size=24)
    u8 = ((x + 1) * 127.5).round()  # (B, 3, H, W) in 0..255
    mean, std = torch.tensor([0.5, 0.25, 0.1]).view(1, 3, 1, 1), torch.tensor([0.5, 0.2, 0.3]).view(1, 3, 1, 1)
    torch.testing.assert_close(enc.preprocess(x), (u8 / 255 - mean) / std, rtol=1e-5, atol=1e-5)


def test_encoder_by_repo_id_from_a_hand_built_offline_cache(tiny_dinov2, tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = build_model_cache(tiny_dinov2, tmp_path / "hf_cache")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # any network request would raise
    x = _images(4)
    by_id = M.load_image_encoder(ENCODER_REPO, device="cpu", cache_dir=str(cache))
    local = M.load_image_encoder(str(tiny_dinov2), device="cpu")
    assert by_id.name == ENCODER_REPO
    torch.testing.assert_close(by_id(x), local(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="tiny-org/not-there"):
        M.load_image_encoder("tiny-org/not-there", device="cpu", cache_dir=str(cache))


def test_encoder_turns_grey_into_rgb(tiny_dinov2):
    enc = M.load_image_encoder(str(tiny_dinov2), device="cpu")
    grey = _images(5, channels=1, seed=3)
    torch.testing.assert_close(enc(grey), enc(grey.repeat(1, 3, 1, 1)), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"\(B, 1 or 3, H, W\)"):
        enc(_images(2, channels=2))


def _noisy(x, level, seed):
    g = torch.Generator().manual_seed(seed)
    return (x + level * torch.randn(x.shape, generator=g)).clamp(-1, 1)


def test_fd_in_encoder_features_is_zero_on_itself_and_grows_with_corruption(tiny_dinov2):
    enc = M.load_image_encoder(str(tiny_dinov2), device="cpu")
    # Smooth "images": low-frequency patterns, so that noise is a corruption the encoder sees.
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.interpolate(torch.rand(120, 3, 4, 4, generator=g) * 2 - 1, size=16, mode="bilinear")
    ref = M.extract_features(enc, x)
    assert M.frechet_distance(ref, ref).distance < 1e-8
    fds = [M.frechet_distance(M.extract_features(enc, _noisy(x, s, 1)), ref).distance for s in (0.0, 0.1, 0.3, 1.0)]
    assert fds[0] < 1e-8 and all(a < b for a, b in zip(fds, fds[1:])), fds
    q = M.sample_quality(_noisy(x, 0.3, 1), x, extractor=enc, kid_num_subsets=10, reference_features=ref,
                         fd_bootstrap=5)
    assert q["fd"] == pytest.approx(fds[2]) and q["extractor"] == str(tiny_dinov2) and q["n_reference"] == 120
    assert q["fd_standard_error"] > 0 and q["mode_coverage"] is None and q["feature_dim"] == 32


def test_fd_in_digit_features_grows_with_corruption(classifier):
    x, _ = load_heldout_digits(resolution=8)
    ref = M.extract_features(classifier, x)
    fds = [M.frechet_distance(M.extract_features(classifier, _noisy(x, s, 2)), ref).distance
           for s in (0.05, 0.2, 0.5, 1.0)]
    assert all(a < b for a, b in zip(fds, fds[1:])), fds


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_encoder_on_cuda_matches_cpu(tiny_dinov2):
    x = _images(6)
    cpu = M.load_image_encoder(str(tiny_dinov2), device="cpu")(x)
    enc = M.load_image_encoder(str(tiny_dinov2))  # default device: cuda
    assert enc.device.type == "cuda"
    torch.testing.assert_close(enc(x), cpu, rtol=1e-3, atol=1e-3)


# ------------------------------------------------------------------- offline: the Hub asked once, quickly


@pytest.fixture
def hub(monkeypatch):
    """huggingface_hub's constants as a test sets them (read at import, so patched, not the environment), and no
    answer kept from another test."""
    from huggingface_hub import constants

    monkeypatch.setattr(encoders, "_HUB_STATUS", {})
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return constants


def test_hub_offline_reason_honours_the_flag_and_asks_an_endpoint_once(hub, monkeypatch):
    import http.server
    import threading
    import time

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(encoders, "_probe_endpoint", lambda *a: pytest.fail("asked the Hub under HF_HUB_OFFLINE=1"))
    assert M.hub_offline_reason() == "HF_HUB_OFFLINE=1"
    monkeypatch.undo()
    monkeypatch.setattr(encoders, "_HUB_STATUS", {})
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    # Nothing listens on port 9: refused at once, and the answer is kept (a second call asks nothing).
    monkeypatch.setattr(hub, "ENDPOINT", "http://127.0.0.1:9")
    start = time.perf_counter()
    reason = M.hub_offline_reason()
    assert time.perf_counter() - start < M.HUB_CHECK_TIMEOUT_S + 1
    assert reason.startswith("no answer from http://127.0.0.1:9") and "\n" not in reason
    probe = encoders._probe_endpoint
    monkeypatch.setattr(encoders, "_probe_endpoint", lambda *a: pytest.fail("asked twice"))
    assert M.hub_offline_reason() == reason
    # A server that answers, even 404 to HEAD /, is reachable.
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.handle_request, daemon=True).start()
    try:
        assert probe(f"http://127.0.0.1:{server.server_port}", 5.0) is None
    finally:
        server.server_close()


def test_an_encoder_the_cache_lacks_fails_at_once_when_the_hub_does_not_answer(tiny_dinov2, hub, monkeypatch,
                                                                                tmp_path):
    import time

    monkeypatch.setattr(hub, "ENDPOINT", "http://127.0.0.1:9")
    cache = build_model_cache(tiny_dinov2, tmp_path / "hf_cache")
    # Cached: loaded from the cache without HF_HUB_OFFLINE and without a request (transformers' adapter look-up
    # asked the Hub despite local_files_only: 23 s of retries), the Hub client's setting restored after.
    start = time.perf_counter()
    assert M.load_image_encoder(ENCODER_REPO, device="cpu", cache_dir=str(cache)).name == ENCODER_REPO
    assert time.perf_counter() - start < 10 and hub.HF_HUB_OFFLINE is False
    start = time.perf_counter()
    with pytest.raises(M.EncoderUnavailableError) as error:
        M.load_image_encoder("tiny-org/not-there", device="cpu", cache_dir=str(cache))
    assert time.perf_counter() - start < 10  # no retries (they took minutes)
    message = str(error.value)
    assert "\n" not in message and "'tiny-org/not-there' is not in the Hugging Face cache" in message
    assert "no answer from http://127.0.0.1:9" in message and "pass a local folder" in message
    assert "no answer from http://127.0.0.1:9" in error.value.cause and "pass" not in error.value.cause
    with pytest.raises(M.EncoderUnavailableError, match="is no folder and no Hub id"):
        M.load_image_encoder(str(tmp_path / "missing" / "encoder"), device="cpu")


# ------------------------------------------------------------------- SWD in reports, and its real-data floor


def test_swd_figures_and_the_real_data_floor(monkeypatch):
    from diffusers_ddpm_ext import swd as S

    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(60, 3, 4, 4, generator=g) * 2 - 1, size=16, mode="bilinear")
    train, reference = smooth[:30], smooth[30:]
    noisy = _noisy(train, 0.5, 3)
    figures = M.sliced_wasserstein_figures(noisy, reference, num_bootstrap=4)
    direct = S.sliced_wasserstein_distance(noisy, reference, num_bootstrap=4).as_dict()
    assert {k: figures[k] for k in direct} == direct and figures["swd_resolutions"] == [16, 8]
    assert {"swd_16", "swd_8", "swd_16_standard_error", "swd_8_standard_error", "swd_method"} <= set(figures)

    calls = []
    monkeypatch.setattr(M, "_FLOOR_MEMO", {})
    real = M.sliced_wasserstein_figures
    monkeypatch.setattr(M, "sliced_wasserstein_figures", lambda *a, **k: calls.append(1) or real(*a, **k))
    floor = M.swd_real_data_floor(train, reference, num_bootstrap=4, reference_split="validation")
    again = M.swd_real_data_floor(train.clone(), reference.clone(), num_bootstrap=4, reference_split="validation")
    assert again == floor and len(calls) == 1  # once per data set and N
    assert (floor["n_real"], floor["n_reference"], floor["split"]) == (30, 30, "train vs validation")
    assert "n_generated" not in floor and "30 real train images" in floor["method"]
    # Real images score well below noisy ones: the floor is what "as good as real" reads.
    assert floor["swd"] + 3 * floor["swd_standard_error"] < figures["swd"]
    # Which training images: a seeded subset, all of them (in order) when there are not more.
    assert M.floor_indices(10, 4) == M.floor_indices(10, 4) != list(range(4))
    assert len(set(M.floor_indices(10, 4))) == 4 and max(M.floor_indices(10, 4)) < 10
    assert M.floor_indices(3, 8) == [0, 1, 2] and M.floor_indices(5, 5) == list(range(5))

"""Data layer: digits, transforms, image folders, `datasets` loading, bad data, resumable order."""

import os
import pickle

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_ddpm_ext import data as D


def _rgb(size, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def _write_folder(root, classes=("cat", "dog"), per_class=3, size=(20, 16)):
    for c_i, c in enumerate(classes):
        os.makedirs(root / c, exist_ok=True)
        for j in range(per_class):
            _rgb(size, 10 * c_i + j).save(root / c / f"{j}.png")
    return root


# ---------------------------------------------------------------------------------------- digits


def test_digits_split_is_fixed_and_disjoint():
    tr, ytr = D.load_digits_split("train")
    ho, yho = D.load_digits_split("heldout")
    assert tr.shape == (1497, 8, 8) and ho.shape == (300, 8, 8) and len(ytr) == 1497 and len(yho) == 300
    assert tr.min() == 0 and tr.max() == 16
    all_, _ = D.load_digits_split("all")
    rows = lambda a: {r.tobytes() for r in a.reshape(len(a), -1)}  # noqa: E731
    assert len(rows(tr) | rows(ho)) == len(rows(all_))  # together they are the whole set
    tr2, _ = D.load_digits_split("train")
    assert np.array_equal(tr, tr2)
    assert set(np.unique(yho)) == set(range(10))
    with pytest.raises(ValueError, match="'train', 'heldout'"):
        D.load_digits_split("test")


@pytest.mark.parametrize("resolution", [8, 16, 24])
def test_digits_nearest_upsample_keeps_the_17_levels(resolution):
    x, y = D.load_digits_tensors("heldout", resolution=resolution, in_channels=1)
    assert x.shape == (300, 1, resolution, resolution) and x.dtype == torch.float32
    levels = torch.linspace(-1, 1, D.DIGITS_NUM_LEVELS)
    assert torch.equal(x.unique(), levels)  # exactly the 17 values -1 + 2k/16 (all of them occur)
    f = resolution // 8
    torch.testing.assert_close(x[:, :, ::f, ::f], D.load_digits_tensors("heldout", 8)[0], rtol=0, atol=0)
    rgb, _ = D.load_digits_tensors("heldout", resolution=resolution, in_channels=3)
    assert rgb.shape == (300, 3, resolution, resolution) and torch.equal(rgb[:, 0], rgb[:, 2])


def test_digits_non_integer_factor_warns_bilinear():
    with pytest.warns(UserWarning, match="bilinear"):
        x, _ = D.load_digits_tensors("heldout", resolution=12)
    assert x.shape == (300, 1, 12, 12) and x.min() >= -1 and x.max() <= 1
    assert x.unique().numel() > D.DIGITS_NUM_LEVELS


def test_default_dataset_is_digits_train():
    ds = D.load_training_dataset(resolution=16, in_channels=1)
    assert isinstance(ds, D.DigitsDataset) and len(ds) == 1497 and ds.num_classes == 10
    item = ds[0]
    assert item["pixel_values"].shape == (1, 16, 16) and item["class_labels"].dtype == torch.long
    ho = D.load_training_dataset(resolution=16, split="heldout")
    x, y = D.load_heldout_digits(16)
    assert len(ho) == 300 and torch.equal(ho[5]["pixel_values"], x[5]) and ho[5]["class_labels"] == y[5]


# ------------------------------------------------------------------------------------- transforms


def test_resize_and_crops():
    im = _rgb((40, 20), 0)  # W=40, H=20
    r = D.resize_shorter_side(im, 10)
    assert r.size == (20, 10)
    assert r.tobytes() == im.resize((20, 10), Image.BILINEAR).tobytes()
    assert D.resize_shorter_side(_rgb((20, 50), 0), 10).size == (10, 25)
    c = D.center_crop(r, 10)
    assert c.size == (10, 10) and c.tobytes() == r.crop((5, 0, 15, 10)).tobytes()
    g = torch.Generator().manual_seed(0)
    crops = {D.random_crop(r, 10, g).tobytes() for _ in range(30)}
    assert len(crops) > 3  # positions vary


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("center", [True, False])
def test_image_transform_shapes_ranges_modes(in_channels, center):
    t = D.ImageTransform(resolution=16, in_channels=in_channels, center_crop=center, random_flip=True)
    for im in (_rgb((40, 24), 1), _rgb((24, 40), 2).convert("L"), _rgb((16, 16), 3).convert("RGBA")):
        x = t(im, torch.Generator().manual_seed(0))
        assert x.shape == (in_channels, 16, 16) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1
    black, white = Image.new("L", (16, 16), 0), Image.new("L", (16, 16), 255)
    assert torch.all(t(black) == -1) and torch.all(t(white) == 1)
    assert pickle.loads(pickle.dumps(t)) == t


def test_flip_is_seeded_and_exact():
    im = _rgb((16, 16), 4)
    plain = D.ImageTransform(16, 3, center_crop=True)(im)
    t = D.ImageTransform(16, 3, center_crop=True, random_flip=True)
    outs = [t(im, torch.Generator().manual_seed(s)) for s in range(20)]
    again = [t(im, torch.Generator().manual_seed(s)) for s in range(20)]
    assert all(torch.equal(a, b) for a, b in zip(outs, again))
    flipped = [torch.equal(o, plain.flip(-1)) for o in outs]
    assert all(f or torch.equal(o, plain) for f, o in zip(flipped, outs))
    assert 0 < sum(flipped) < 20


def test_mode_conversion_policy():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red -> black
    assert np.asarray(D.convert_image_mode(rgba, 3)).max() == 0
    p = Image.new("P", (8, 8), 1)
    p.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    p.info["transparency"] = 1
    assert D.convert_image_mode(p, 1).mode == "L"
    assert D.convert_image_mode(Image.new("CMYK", (8, 8)), 3).mode == "RGB"
    with pytest.raises(D.BadImageError, match="I;16"):
        D.convert_image_mode(Image.fromarray(np.zeros((8, 8), np.uint16)), 1)
    with pytest.raises(ValueError, match="in_channels"):
        D.ImageTransform(16, 4)
    with pytest.raises(ValueError, match="resolution"):
        D.ImageTransform(0, 3)


# ------------------------------------------------------------------------------------ image folder


def test_image_folder_with_class_subfolders(tmp_path):
    root = _write_folder(tmp_path / "imgs")
    (root / "notes.txt").write_text("ignored")
    ds = D.load_training_dataset(train_data_dir=str(root), resolution=16, in_channels=3, center_crop=True)
    assert len(ds) == 6 and ds.class_names == ["cat", "dog"] and ds.num_classes == 2
    assert [int(ds[i]["class_labels"]) for i in range(6)] == [0, 0, 0, 1, 1, 1]
    assert ds[0]["pixel_values"].shape == (3, 16, 16)
    grey = D.load_training_dataset(train_data_dir=str(root / "cat"), resolution=8, in_channels=1)
    assert len(grey) == 3 and grey.class_names is None and "class_labels" not in grey[0]
    assert grey[0]["pixel_values"].shape == (1, 8, 8)
    with pytest.raises(ValueError, match="not a directory"):
        D.load_training_dataset(train_data_dir=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="not both"):
        D.load_training_dataset(dataset_name="x", train_data_dir=str(root))


# ------------------------------------------------------------------------------- datasets library


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    return str(tmp_path / "hf_cache")


def _hf_dataset(n=6, image_name="img"):
    return datasets.Dataset.from_dict(
        {image_name: [_rgb((12, 12), i) for i in range(n)], "digit": [i % 3 for i in range(n)],
         "name": ["b" if i % 2 else "a" for i in range(n)]},
        features=datasets.Features({image_name: datasets.Image(), "digit": datasets.Value("int64"),
                                    "name": datasets.Value("string")}),
    )


def test_local_parquet_folder_through_load_dataset(tmp_path, offline):
    root = tmp_path / "my_dataset"
    os.makedirs(root / "data")
    _hf_dataset().to_parquet(str(root / "data" / "train-00000-of-00001.parquet"))
    ds = D.load_training_dataset(dataset_name=str(root), class_column="digit", resolution=8, in_channels=3,
                                 cache_dir=offline)
    assert isinstance(ds, D.HFImageDataset) and ds.image_column == "img"  # auto-detected
    assert len(ds) == 6 and ds.num_classes == 3
    assert ds[4]["pixel_values"].shape == (3, 8, 8) and int(ds[4]["class_labels"]) == 1
    by_name = D.load_training_dataset(dataset_name=str(root), class_column="name", resolution=8, cache_dir=offline)
    assert by_name.class_names == ["a", "b"] and int(by_name[1]["class_labels"]) == 1
    with pytest.raises(ValueError, match=r"image_column 'pixels' not found.*\['img', 'digit', 'name'\]"):
        D.load_training_dataset(dataset_name=str(root), image_column="pixels", resolution=8, cache_dir=offline)
    with pytest.raises(ValueError, match=r"class_column 'label' not found.*\['img', 'digit', 'name'\]"):
        D.load_training_dataset(dataset_name=str(root), class_column="label", resolution=8, cache_dir=offline)
    with pytest.raises(ValueError, match="expected datasets.Image"):
        D.load_training_dataset(dataset_name=str(root), image_column="name", resolution=8, cache_dir=offline)


def test_imagefolder_and_save_to_disk_through_datasets(tmp_path, offline):
    root = _write_folder(tmp_path / "imgs")
    ds = D.load_training_dataset(dataset_name=str(root), class_column="label", resolution=8, in_channels=1,
                                 cache_dir=offline)
    assert ds.image_column == "image" and ds.class_names == ["cat", "dog"] and len(ds) == 6
    saved = tmp_path / "saved"
    _hf_dataset(image_name="picture").remove_columns(["name"]).save_to_disk(str(saved))
    ds = D.load_training_dataset(dataset_name=str(saved), resolution=8, in_channels=3)
    assert ds.image_column == "picture" and len(ds) == 6 and "class_labels" not in ds[0]
    no_image = datasets.Dataset.from_dict({"a": [1, 2]})
    no_image.save_to_disk(str(tmp_path / "noimg"))
    with pytest.raises(ValueError, match=r"no image column.*\['a'\]"):
        D.load_training_dataset(dataset_name=str(tmp_path / "noimg"), resolution=8)
    with pytest.raises(ValueError, match="could not load dataset"):
        D.load_training_dataset(dataset_name="someone/not-a-real-dataset-xyz", resolution=8, cache_dir=offline)


# ------------------------------------------------------------------------------------------ bad data


def _bad_folder(root):
    _write_folder(root, classes=("a",), per_class=4, size=(16, 16))
    (root / "a" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    (root / "a" / "empty.jpg").write_bytes(b"")
    Image.fromarray(np.full((16, 16), 1000, np.uint16)).save(root / "a" / "deep.png")  # mode I;16
    _rgb((4, 4), 9).save(root / "a" / "tiny.png")
    good = root / "a" / "0.png"
    truncated = good.read_bytes()
    (root / "a" / "truncated.png").write_bytes(truncated[: len(truncated) // 2])
    return root


def test_bad_images_fail_up_front_naming_each_file(tmp_path):
    root = _bad_folder(tmp_path / "bad")
    with pytest.raises(D.BadImageError) as e:
        D.load_training_dataset(train_data_dir=str(root), resolution=16, in_channels=3)
    msg = str(e.value)
    for name, why in [("corrupt.png", "corrupt"), ("empty.jpg", "empty"), ("deep.png", "unsupported mode"),
                      ("tiny.png", "too small"), ("truncated.png", "corrupt")]:
        line = next(line for line in msg.splitlines() if name in line)
        assert why in line, line
    assert "5 of 9 images" in msg and "skip_bad_images" in msg


def test_bad_images_skipped_and_counted(tmp_path):
    root = _bad_folder(tmp_path / "bad")
    with pytest.warns(UserWarning, match=r"skipped 5 of 9 images: 2 corrupt, 1 empty, 1 unsupported mode, "
                                         r"1 too small \(first: .*corrupt\.png\)"):
        ds = D.load_training_dataset(train_data_dir=str(root), resolution=16, in_channels=3, skip_bad_images=True)
    assert len(ds) == 4 and ds.scan_report.counts == {"corrupt": 2, "empty": 1, "unsupported_mode": 1,
                                                      "too_small": 1}
    assert all(ds[i]["pixel_values"].shape == (3, 16, 16) for i in range(4))
    # The size limit follows the resolution: max(min(8, resolution), resolution // 4).
    assert D.min_image_size(16) == 8 and D.min_image_size(8) == 8 and D.min_image_size(256) == 64


def test_bad_rows_in_a_datasets_dataset(tmp_path):
    import io

    buf = io.BytesIO()
    _rgb((12, 12), 0).save(buf, format="PNG")
    rows = [{"bytes": buf.getvalue(), "path": None}, {"bytes": b"garbage", "path": "broken.png"},
            {"bytes": buf.getvalue(), "path": None}]
    ds = datasets.Dataset.from_dict({"image": rows}, features=datasets.Features({"image": datasets.Image()}))
    saved = tmp_path / "saved"
    ds.save_to_disk(str(saved))
    with pytest.raises(D.BadImageError, match=r"row 1 \(broken.png\): corrupt"):
        D.load_training_dataset(dataset_name=str(saved), resolution=8)
    with pytest.warns(UserWarning, match="skipped 1 of 3 images: 1 corrupt"):
        ok = D.load_training_dataset(dataset_name=str(saved), resolution=8, skip_bad_images=True)
    assert len(ok) == 2 and ok.indices == [0, 2]


# --------------------------------------------------------------------------------- resumable order


def _stream(loader, key="pixel_values"):
    return [b[key].clone() for b in loader]


def test_skipping_k_batches_equals_the_tail_of_the_epoch():
    ds = D.DigitsDataset("heldout", resolution=8, random_flip=True)
    loader = D.make_dataloader(ds, batch_size=32, seed=123)
    sampler = loader.batch_sampler
    assert sampler.batches_per_epoch == 10 and len(loader) == 10
    sampler.set_epoch(3)
    full = _stream(loader)
    assert len(full) == 10 and full[-1].shape[0] == 300 - 9 * 32
    for k in (0, 1, 7, 10):
        sampler.set_epoch(3)
        sampler.skip(k)
        sampler.set_epoch(3)  # Accelerate's DataLoaderShard calls set_epoch at __iter__: the skip survives
        assert len(loader) == 10 - k
        tail = _stream(loader)
        assert len(tail) == 10 - k and all(torch.equal(a, b) for a, b in zip(tail, full[k:]))
        assert len(loader) == 10  # the skip is one-shot
    # A fresh loader (a resumed process) reproduces the same epoch; other epochs and seeds differ.
    fresh = D.make_dataloader(D.DigitsDataset("heldout", resolution=8, random_flip=True), 32, seed=123)
    fresh.batch_sampler.set_epoch(3)
    assert all(torch.equal(a, b) for a, b in zip(_stream(fresh), full))
    fresh.batch_sampler.set_epoch(4)
    assert not torch.equal(_stream(fresh)[0], full[0])
    other = D.make_dataloader(ds, 32, seed=124)
    other.batch_sampler.set_epoch(3)
    assert not torch.equal(_stream(other)[0], full[0])
    with pytest.raises(ValueError, match="num_batches"):
        sampler.skip(11)


def test_resume_position():
    assert D.resume_position(0, 10) == (0, 0)
    assert D.resume_position(23, 10) == (2, 3)
    assert D.resume_position(30, 10) == (3, 0)


@pytest.mark.parametrize("drop_last", [False, True])
def test_sharding_across_processes_partitions_each_global_batch(drop_last):
    n, bs = 50, 4
    single = D.ResumableBatchSampler(n, bs * 2, seed=5, drop_last=drop_last)
    ranks = [D.ResumableBatchSampler(n, bs, seed=5, drop_last=drop_last, num_replicas=2, rank=r) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == single.batches_per_epoch == (6 if drop_last else 7)
    for b_single, b0, b1 in zip(single, ranks[0], ranks[1]):
        if len(b_single) == 2 * bs:
            assert b0 + b1 == b_single  # rank r takes the r-th slice of the same global batch
        else:  # last partial batch (2 left): padded to a multiple of 2 and split evenly
            assert len(b0) == len(b1) == 1 and b0 + b1 == b_single
    seen = [i for b in ranks[0] for i, _ in b] + [i for b in ranks[1] for i, _ in b]
    assert len(set(seen)) == (48 if drop_last else 50)
    with pytest.raises(ValueError, match="rank"):
        D.ResumableBatchSampler(n, bs, num_replicas=2, rank=2)


def test_stream_does_not_depend_on_workers_and_dataset_pickles(tmp_path):
    root = _write_folder(tmp_path / "imgs", per_class=4, size=(24, 20))
    ds = D.load_training_dataset(train_data_dir=str(root), resolution=16, in_channels=3, random_flip=True)
    assert pickle.loads(pickle.dumps(ds)).paths == ds.paths
    streams = []
    for workers in (0, 2):
        loader = D.make_dataloader(ds, batch_size=3, seed=9, num_workers=workers)
        loader.batch_sampler.set_epoch(1)
        streams.append(_stream(loader))
    assert len(streams[0]) == 3
    assert all(torch.equal(a, b) for a, b in zip(*streams))
    labels = [int(x) for b in D.make_dataloader(ds, batch_size=8, seed=9) for x in b["class_labels"]]
    assert sorted(labels) == [0] * 4 + [1] * 4


# ------------------------------------------------------------------------------- validation split


def test_validation_size_parsing_and_bounds():
    assert D.parse_validation_size("500") == 500 and D.parse_validation_size("0.1") == 0.1
    with pytest.raises(ValueError, match="'ten'"):
        D.parse_validation_size("ten")
    assert D.resolve_validation_size(None, 50) == 5  # 10 %
    assert D.resolve_validation_size(None, 5) == 1  # at least one
    assert D.resolve_validation_size(None, 100_000) == D.DEFAULT_VALIDATION_MAX_IMAGES  # capped
    assert D.resolve_validation_size(0.25, 10) == 2 and D.resolve_validation_size(3, 10) == 3
    for bad, match in [(0, "int >= 1"), (-2, "int >= 1"), (1.5, r"\(0, 1\)"), (10, "leaves no training"),
                       (True, "int >= 1"), ("3", "None, an int")]:
        with pytest.raises(ValueError, match=match):
            D.resolve_validation_size(bad, 10)
    with pytest.raises(ValueError, match="at least 2 images"):
        D.resolve_validation_size(None, 1)


def test_split_indices_are_disjoint_seeded_and_order_free():
    keys = [f"img_{i}.png" for i in range(40)]
    train, val = D.validation_split_indices(keys, 0.25, seed=3)
    assert len(val) == 10 and sorted(train + val) == list(range(40)) and not set(train) & set(val)
    assert D.validation_split_indices(keys, 0.25, seed=3) == (train, val)  # same seed, same split
    assert D.validation_split_indices(keys, 0.25, seed=4)[1] != val
    # The split follows the names, not their listing order.
    rev = keys[::-1]
    _, val_rev = D.validation_split_indices(rev, 0.25, seed=3)
    assert {rev[i] for i in val_rev} == {keys[i] for i in val}
    # Nested sizes: the 5 validation images of a smaller split are among the 10 of the larger one.
    _, val5 = D.validation_split_indices(keys, 5, seed=3)
    assert set(val5) < set(val)
    with pytest.raises(ValueError, match="distinct"):
        D.validation_split_indices(["a", "a", "b"], 1)


def test_image_folder_split_never_overlaps_and_is_deterministic(tmp_path):
    root = _write_folder(tmp_path / "imgs", per_class=10, size=(20, 16))
    split = D.load_train_validation_split(train_data_dir=str(root), resolution=16, in_channels=3,
                                          random_flip=True, validation_size=0.2, validation_split_seed=1)
    info = split.info
    assert (info["split"], info["num_images"], info["num_train_images"], info["seed"]) == ("validation", 4, 16, 1)
    assert info["num_levels"] == 256 and "SHA-256" in info["method"] and str(root) in info["source"]
    assert len(split.train) == 16 and len(split.validation) == 4
    assert split.train.class_names == split.validation.class_names == ["cat", "dog"]
    base = split.train.dataset
    train_files = {base.paths[i] for i in split.train.indices}
    val_files = {split.validation.dataset.paths[i] for i in split.validation.indices}
    assert len(train_files | val_files) == 20 and not train_files & val_files
    # Validation images are loaded without augmentation (center crop, no flip): every call gives the same pixels.
    x1, y1 = D.dataset_to_tensors(split.validation)
    x2, _ = D.dataset_to_tensors(split.validation)
    assert x1.shape == (4, 3, 16, 16) and torch.equal(x1, x2) and y1.dtype == torch.int64
    center = D.ImageTransform(16, 3, center_crop=True)
    for k, i in enumerate(split.validation.indices):
        with Image.open(base.paths[i]) as im:
            assert torch.equal(x1[k], center(im))
    # The training part keeps its augmentation and the (index, seed) key protocol of the sampler.
    item = split.train[(0, 5)]
    assert torch.equal(item["pixel_values"], base[(split.train.indices[0], 5)]["pixel_values"])
    # A fresh load (a resumed run) gives the same split.
    again = D.load_train_validation_split(train_data_dir=str(root), resolution=16, in_channels=3,
                                          validation_size=0.2, validation_split_seed=1)
    assert again.validation.indices == split.validation.indices and again.train.indices == split.train.indices


@pytest.mark.parametrize("world", [1, 2])
def test_sharded_training_never_sees_validation_images(tmp_path, world):
    root = _write_folder(tmp_path / "imgs", per_class=12, size=(16, 16))
    split = D.load_train_validation_split(train_data_dir=str(root), resolution=16, in_channels=3, validation_size=6)
    base = split.train.dataset
    val_files = {base.paths[i] for i in split.validation.indices}
    seen = set()
    for rank in range(world):
        loader = D.make_dataloader(split.train, batch_size=3, seed=0, num_replicas=world, rank=rank)
        for epoch in range(2):
            loader.batch_sampler.set_epoch(epoch)
            for batch in loader.batch_sampler:
                seen |= {base.paths[split.train.indices[i]] for i, _ in batch}
    assert len(seen) == 18 and not seen & val_files


def test_split_is_the_same_in_other_processes(tmp_path):
    """Another process (other PYTHONHASHSEED, other rank/world-size variables) computes the same split."""
    import json
    import subprocess
    import sys

    root = _write_folder(tmp_path / "imgs", per_class=8, size=(16, 16))
    code = ("import json, sys; from diffusers_ddpm_ext import data as D; "
            "s = D.load_train_validation_split(train_data_dir=sys.argv[1], resolution=16, in_channels=3, "
            "validation_size=0.25); d = s.validation.dataset; "
            "print(json.dumps(sorted(d.paths[i] for i in s.validation.indices)))")
    runs = []
    for hash_seed, rank, world in (("1", "0", "1"), ("2", "1", "2")):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed, RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=world,
                   OMP_NUM_THREADS="1")
        out = subprocess.run([sys.executable, "-c", code, str(root)], env=env, capture_output=True, text=True,
                             check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert runs[0] == runs[1] and len(runs[0]) == 4


def test_digits_keep_their_fixed_heldout_split():
    split = D.load_train_validation_split(resolution=16, in_channels=1)
    assert (split.info["split"], split.info["num_images"], split.info["num_train_images"]) == ("heldout", 300, 1497)
    assert split.info["num_levels"] == D.DIGITS_NUM_LEVELS
    x, y = D.dataset_to_tensors(split.validation)
    ref_x, ref_y = D.load_heldout_digits(16, 1)
    assert torch.equal(x, ref_x) and torch.equal(y, ref_y)
    sub = D.load_train_validation_split(resolution=8, validation_size=50, validation_split_seed=2)
    assert sub.info["num_images"] == 50 and len(sub.train) == 1497
    sx, _ = D.dataset_to_tensors(sub.validation)
    heldout = {r.numpy().tobytes() for r in D.load_heldout_digits(8)[0]}
    assert all(r.numpy().tobytes() in heldout for r in sx)  # a subset of the 300, never training digits
    with pytest.raises(ValueError, match="'train' split"):
        D.split_train_validation(D.DigitsDataset("heldout"))


def test_datasets_dataset_uses_its_own_test_split(tmp_path, offline):
    root = tmp_path / "with_test"
    os.makedirs(root / "data")
    _hf_dataset(8).to_parquet(str(root / "data" / "train-00000-of-00001.parquet"))
    test = _hf_dataset(5)
    test = datasets.Dataset.from_dict({"img": [_rgb((12, 12), 100 + i) for i in range(5)],
                                       "digit": [2, 2, 0, 2, 0], "name": ["b"] * 5},
                                      features=test.features)
    test.to_parquet(str(root / "data" / "test-00000-of-00001.parquet"))
    split = D.load_train_validation_split(dataset_name=str(root), class_column="name", resolution=8, in_channels=3,
                                          cache_dir=offline)
    assert (split.info["split"], split.info["num_images"], split.info["num_train_images"]) == ("test", 5, 8)
    assert "own 'test' split" in split.info["method"]
    # String labels map through the training split's names ("a" = 0, "b" = 1) although "a" is absent here.
    _, labels = D.dataset_to_tensors(split.validation)
    assert labels.tolist() == [1] * 5 and split.validation.class_names == ["a", "b"]
    sub = D.load_train_validation_split(dataset_name=str(root), resolution=8, validation_size=2, cache_dir=offline)
    assert sub.info["num_images"] == 2 and sub.info["seed"] == 0
    # Without its own split the rows are carved.
    one = tmp_path / "single"
    os.makedirs(one / "data")
    _hf_dataset(10).to_parquet(str(one / "data" / "train-00000-of-00001.parquet"))
    carved = D.load_train_validation_split(dataset_name=str(one), resolution=8, validation_size=3, cache_dir=offline)
    assert carved.info["split"] == "validation" and carved.info["num_images"] == 3 and len(carved.train) == 7
    assert not set(carved.train.indices) & set(carved.validation.indices)


def test_saved_dataset_dict_with_validation_split(tmp_path):
    saved = tmp_path / "dd"
    datasets.DatasetDict(train=_hf_dataset(6), validation=_hf_dataset(3)).save_to_disk(str(saved))
    assert D.dataset_split_names(str(saved)) == ["train", "validation"]
    split = D.load_train_validation_split(dataset_name=str(saved), resolution=8, in_channels=3)
    assert (split.info["split"], split.info["num_images"], len(split.train)) == ("validation", 3, 6)

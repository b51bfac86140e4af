"""Data loading: ImageFolder semantics through `datasets`, splits, Hub-style datasets."""

import os

import datasets
import PIL.Image
import pytest

from common.config import FinetuneConfig, parse_config
from common.data import (build_dataloaders, load_hub_dataset, load_image_folder,
                         training_transforms)
from common.errors import UserError
from conftest import COLOURS, make_image_folder, write_image


def test_image_folder_counts_only_imagefolder_extensions(tmp_path):
    root = make_image_folder(tmp_path / "d", counts={"train": 4, "val": 2})
    # what the ants/bees set and real folders contain besides images
    write_image(str(tmp_path / "d/train/cat/imageNotFound.gif"), COLOURS["cat"], fmt="GIF")
    (tmp_path / "d/train/dog/notes.txt").write_text("not an image")
    (tmp_path / "d/val/fox/.DS_Store").write_bytes(b"\0\1")
    write_image(str(tmp_path / "d/train/fox/nested/deep.png"), COLOURS["fox"])
    train, val, classes = load_image_folder(root, 0.2, 0)
    assert classes == ["cat", "dog", "fox"]
    assert len(train) == 3 * 4 + 1 and len(val) == 3 * 2
    assert train.features["label"].names == classes
    labels = train["label"]
    assert labels.count(2) == 5  # fox: 4 + the nested png
    assert not any(p["path"].endswith((".gif", ".txt")) for p in train.cast_column(
        "image", datasets.Image(decode=False))["image"])


def test_train_and_val_with_different_classes_is_an_error(tmp_path):
    root = make_image_folder(tmp_path / "d", counts={"train": 2, "val": 1})
    os.rename(tmp_path / "d/val/fox", tmp_path / "d/val/wolf")
    with pytest.raises(UserError, match=r"only in train: \['fox'\].*only in val: \['wolf'\]"):
        load_image_folder(root, 0.2, 0)


@pytest.mark.parametrize("layout", ["missing", "empty", "no_train", "no_classes"])
def test_unusable_data_dir_names_the_flag(tmp_path, layout):
    root = tmp_path / "d"
    if layout != "missing":
        root.mkdir()
    if layout == "no_classes":
        (root / "train").mkdir()
    with pytest.raises(UserError, match="--data-dir"):
        load_image_folder(str(root), 0.2, 0)


def test_no_val_folder_splits_a_seeded_stratified_fraction(tmp_path, capsys):
    root = make_image_folder(tmp_path / "d", counts={"train": 10}, splits=("train",))
    train, val, classes = load_image_folder(root, 0.2, seed=3)
    assert len(train) == 24 and len(val) == 6
    assert sorted(val["label"]) == [0, 0, 1, 1, 2, 2]  # stratified
    again = load_image_folder(root, 0.2, seed=3)[1]
    assert again["label"] == val["label"]
    assert "no val/ folder" in capsys.readouterr().out


def _parquet_dataset(tmp_path, image_col="img", label_col="species", val=True):
    root = make_image_folder(tmp_path / "imgs", counts={"train": 3, "val": 2})
    out = tmp_path / "pq"
    out.mkdir()
    for split, name in (("train", "train"), ("val", "validation"))[: 2 if val else 1]:
        files = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(os.path.join(root, split))
                       for f in fs)
        ds = datasets.Dataset.from_dict(
            {image_col: files, label_col: [os.path.basename(os.path.dirname(f)) for f in files]})
        ds = ds.cast_column(image_col, datasets.Image())  # embeds the bytes in parquet
        ds.to_parquet(str(out / f"{name}-00000.parquet"))
    return str(out)


def test_local_dataset_with_custom_columns_and_string_labels(tmp_path):
    path = _parquet_dataset(tmp_path)
    cfg = FinetuneConfig(dataset=path, image_column="img", label_column="species")
    train, val, classes = load_hub_dataset(cfg)
    assert classes == ["cat", "dog", "fox"]
    assert len(train) == 9 and len(val) == 6
    assert val.features["label"].names == classes
    img = train[0]["image"]
    assert img.size == (48, 40)


def test_dataset_without_the_columns_lists_what_it_has(tmp_path):
    path = _parquet_dataset(tmp_path)
    cfg = FinetuneConfig(dataset=path)  # defaults: image / label
    with pytest.raises(UserError, match=r"no column 'image' \(it has img, species\).*--image-column"):
        load_hub_dataset(cfg)


def test_dataset_without_validation_split_holds_out_a_fraction(tmp_path, capsys):
    path = _parquet_dataset(tmp_path, val=False)
    cfg = FinetuneConfig(dataset=path, image_column="img", label_column="species",
                         val_fraction=1 / 3)
    train, val, classes = load_hub_dataset(cfg)
    assert len(train) == 6 and len(val) == 3
    assert "no validation split" in capsys.readouterr().out


def test_loaders_apply_the_models_preprocessing(tmp_path):
    root = make_image_folder(tmp_path / "d", counts={"train": 2, "val": 1})
    train, val, classes = load_image_folder(root, 0.2, 0)
    pre = dict(input_size=64, resize=72, mean=[0.5] * 3, std=[0.25] * 3,
               interpolation="bilinear")
    cfg = FinetuneConfig(batch_size=4, num_workers=0)
    train_loader, val_loader = build_dataloaders(train, val, pre, cfg, num_processes=1)
    batch = next(iter(val_loader))
    assert batch["pixel_values"].shape == (3, 3, 64, 64)
    assert batch["labels"].tolist() == [0, 1, 2]
    # (x - 0.5) / 0.25 of a red image: the red channel is clearly positive, green negative
    means = batch["pixel_values"][0].mean(dim=(1, 2))
    assert means[0] > 0.5 and means[1] < -0.5
    assert next(iter(train_loader))["pixel_values"].shape == (4, 3, 64, 64)
    # --train-size: smaller training crops; evaluation stays at the model's input size
    cfg = FinetuneConfig(batch_size=4, num_workers=0, train_size=48)
    train_loader, val_loader = build_dataloaders(train, val, pre, cfg, num_processes=1)
    assert next(iter(train_loader))["pixel_values"].shape == (4, 3, 48, 48)
    assert next(iter(val_loader))["pixel_values"].shape == (3, 3, 64, 64)
    # ... but the cached features of the linear probe are computed at the input size
    probe_tf, _ = training_transforms(pre, cfg, for_features=True)
    assert probe_tf(PIL.Image.new("RGB", (90, 80))).shape == (3, 64, 64)


def test_seeded_transform_repeats_and_leaves_the_global_rng_as_it_was():
    # each training sample's augmentation is a function of its own seed, whatever drew from
    # the global RNG before it; and it draws nothing from the global stream itself
    import torch
    from common.images import seeded

    def draw(_):
        return torch.rand(3)

    torch.manual_seed(5)
    expected_next = torch.rand(2)
    torch.manual_seed(5)
    a = seeded(draw, None, 123)
    torch.rand(7)  # anything in between
    b = seeded(draw, None, 123)
    assert torch.equal(a, b) and not torch.equal(a, seeded(draw, None, 124))
    torch.manual_seed(5)
    seeded(draw, None, 123)
    assert torch.equal(torch.rand(2), expected_next)


def test_a_batch_decoded_on_threads_is_the_samples_one_by_one(tmp_path):
    # ImageDataset.__getitems__ (what the DataLoader calls) decodes on threads and leaves the
    # pixels uint8; its collate converts and normalises the whole batch, channels-last or
    # not: the same numbers as __getitem__'s samples stacked, in order, with and without a
    # seeded augmentation, with --random-erasing (which runs after normalising, per image),
    # and in a loader worker (no threads there)
    import threading

    import torch
    from common.data import ImageDataset, build_transforms

    root = make_image_folder(tmp_path / "d", counts={"train": 4, "val": 3})
    train, _, _ = load_image_folder(root, 0.2, 0)
    pre = dict(input_size=32, resize=36, mean=[0.485, 0.456, 0.406],
               std=[0.229, 0.224, 0.225], interpolation="bilinear")
    train_tf, eval_tf = build_transforms(pre)
    erase_tf, _ = build_transforms(pre, random_erasing=1.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for ds in (ImageDataset(train, eval_tf), ImageDataset(train, train_tf, seed=3),
                   ImageDataset(train, erase_tf, seed=3)):
            indices = [7, 0, 11, 3, 5]
            one_by_one = [ds[i] for i in indices]
            stacked = torch.stack([s["pixel_values"] for s in one_by_one])
            samples = ds.__getitems__(indices)
            # uint8 until collated, unless the transform erases after normalising; the
            # default augmentation's resizes on the threads (its draws here), not erasing's
            assert samples[0]["pixel_values"].dtype == (
                torch.float32 if ds.transform is erase_tf else torch.uint8)
            assert (ds.draws is not None) == (ds.transform is train_tf)
            assert any(t.name.startswith("decode") for t in threading.enumerate())
            for channels_last in (False, True):
                batch = ds.collate(channels_last)(samples)
                assert batch["index"].tolist() == indices
                assert batch["labels"].tolist() == [s["labels"] for s in one_by_one]
                assert batch["pixel_values"].dtype == torch.float32
                assert torch.equal(batch["pixel_values"], stacked)
                assert batch["pixel_values"].is_contiguous(
                    memory_format=torch.channels_last if channels_last
                    else torch.contiguous_format)
            loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=1,
                                                 collate_fn=ds.collate(True))
            worker = next(iter(loader))["pixel_values"]
            assert torch.equal(worker, torch.stack([ds[i]["pixel_values"] for i in range(5)]))
    finally:
        torch.set_num_threads(threads)


def _int_label_dataset(tmp_path, train_labels, val_labels, val_split="validation"):
    """A parquet dataset with plain int labels; each image's colour encodes its label, so
    we can check which label an example carries after loading."""
    out = tmp_path / "pq"
    out.mkdir(parents=True)
    for split, labels in (("train", train_labels), (val_split, val_labels)):
        files = []
        for i, lab in enumerate(labels):
            files.append(write_image(str(tmp_path / "imgs" / split / f"{i}.png"),
                                     (lab * 20 % 256, 0, 0)))
        ds = datasets.Dataset.from_dict({"image": files, "label": labels})
        ds.cast_column("image", datasets.Image()).to_parquet(str(out / f"{split}-00000.parquet"))
    return str(out)


def test_the_collate_normalises_as_torchvision_does_in_both_layouts():
    """The batch's conversion and normalisation, to the bit, for a mean and std per channel
    and for one value for every channel (which Normalize broadcasts), at an odd size."""
    import torch
    from torchvision.transforms import v2
    from common.data import ImageCollate
    g = torch.Generator().manual_seed(0)
    xs = [torch.randint(0, 256, (5, 7, 3), dtype=torch.uint8, generator=g).permute(2, 0, 1)
          for _ in range(4)]  # CHW views of HWC pixels, as ToImage gives them
    samples = [{"pixel_values": x, "labels": 0, "index": i} for i, x in enumerate(xs)]
    for mean, std in (([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]), ([0.5], [0.25])):
        expected = torch.stack([v2.Normalize(mean, std)(v2.ToDtype(torch.float32, scale=True)(x))
                                for x in xs])
        for channels_last in (False, True):
            out = ImageCollate((mean, std), channels_last)(samples)["pixel_values"]
            assert torch.equal(out, expected)
            assert out.is_contiguous(memory_format=torch.channels_last if channels_last
                                     else torch.contiguous_format)


def test_int_labels_map_the_same_way_in_train_and_val_beyond_ten_classes(tmp_path):
    labels = list(range(12))  # as text, "10" and "11" would sort before "2"
    path = _int_label_dataset(tmp_path, labels * 2, labels)
    train, val, classes = load_hub_dataset(FinetuneConfig(dataset=path))
    assert classes == [str(i) for i in range(12)]
    for ds, raw in ((train, labels * 2), (val, labels)):
        assert ds["label"] == [classes.index(str(v)) for v in raw]  # class k is label k
        assert ds.features["label"].names == classes
    # the same image content (the raw label) gets the same index in both splits
    red = lambda ds, i: ds[i]["image"].getpixel((0, 0))[0]  # noqa: E731
    assert {red(train, i): train[i]["label"] for i in range(12)} == \
        {red(val, i): val[i]["label"] for i in range(12)}


def test_int_labels_with_gaps_and_an_unknown_val_label(tmp_path):
    path = _int_label_dataset(tmp_path, [3, 7, 12, 3, 7, 12], [12, 3, 7])
    train, val, classes = load_hub_dataset(FinetuneConfig(dataset=path))
    assert classes == ["3", "7", "12"] and val["label"] == [2, 0, 1]
    bad = _int_label_dataset(tmp_path / "b", [3, 7, 3, 7], [3, 9])
    with pytest.raises(UserError, match="labels that train does not .9."):
        load_hub_dataset(FinetuneConfig(dataset=bad))


def test_a_test_split_standing_in_for_validation_is_said_in_one_line(tmp_path, capsys):
    path = _int_label_dataset(tmp_path, [0, 1, 0, 1], [1, 0], val_split="test")
    train, val, classes = load_hub_dataset(FinetuneConfig(dataset=path))
    assert len(val) == 2
    lines = [line for line in capsys.readouterr().out.splitlines() if "'test'" in line]
    assert len(lines) == 1 and "no 'validation' split" in lines[0]


def test_val_images_are_read_once_then_served_from_memory(tmp_path):
    # the val loader keeps each image's uint8 pixels from the first epoch (--val-cache-mb):
    # later epochs give the same batches, to the bit, without reading a file (the val folder
    # is moved away to prove it), in the process or in persistent loader workers; past the
    # budget the other images are read every time; --val-cache-mb 0 reads them all each time
    import shutil

    import torch
    from common.data import ImageDataset, build_transforms

    root = make_image_folder(tmp_path / "d", counts={"train": 2, "val": 3})
    train, val, _ = load_image_folder(root, 0.2, 0)
    pre = dict(input_size=32, resize=36, mean=[0.5] * 3, std=[0.25] * 3,
               interpolation="bilinear")
    val_dir, away = os.path.join(root, "val"), str(tmp_path / "away")
    _, uncached = build_dataloaders(train, val, pre, FinetuneConfig(batch_size=4, num_workers=0,
                                                                    val_cache_mb=0), 1)
    assert uncached.dataset.cache is None
    expected = [b["pixel_values"] for b in uncached]
    for workers in (0, 2):
        cfg = FinetuneConfig(batch_size=4, num_workers=workers)
        _, loader = build_dataloaders(train, val, pre, cfg, num_processes=1)
        assert all(torch.equal(b["pixel_values"], e) for b, e in zip(loader, expected))
        shutil.move(val_dir, away)
        try:
            again = [b["pixel_values"] for b in loader]
            with pytest.raises(FileNotFoundError):
                list(uncached)
        finally:
            shutil.move(away, val_dir)
        assert len(again) == len(expected)
        assert all(torch.equal(a, e) for a, e in zip(again, expected))
    # a budget of two images' pixels: two kept, the others read each time
    _, eval_tf = build_transforms(pre)
    ds = ImageDataset(val, eval_tf, cache_bytes=2 * 3 * 32 * 32)
    ds.__getitems__(list(range(len(val))))
    assert sorted(ds.cache.samples) == [0, 1]
    shutil.move(val_dir, away)
    try:
        assert [s["index"] for s in ds.__getitems__([1, 0])] == [1, 0]
        with pytest.raises(FileNotFoundError):
            ds.__getitems__([0, 2])
    finally:
        shutil.move(away, val_dir)
    with pytest.raises(UserError, match="--val-cache-mb must be >= 0"):
        parse_config(FinetuneConfig, "", ["--val-cache-mb", "-2"])


def test_each_loader_worker_caches_its_share_of_the_val_budget(tmp_path):
    # persistent workers each hold a cache: with a budget of two images and two workers, each
    # keeps one (the first it reads), so the later epoch serves two batches from memory and
    # the third needs its file; a worker holding the whole budget would have served four
    import shutil

    import torch
    from common.data import ImageDataset, build_transforms

    root = make_image_folder(tmp_path / "d", counts={"train": 1, "val": 3})
    _, val, _ = load_image_folder(root, 0.2, 0)
    pre = dict(input_size=32, resize=36, mean=[0.5] * 3, std=[0.25] * 3,
               interpolation="bilinear")
    _, eval_tf = build_transforms(pre)
    ds = ImageDataset(val, eval_tf, cache_bytes=2 * 3 * 32 * 32)
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=2,
                                         persistent_workers=True, collate_fn=ds.collate())
    assert len(list(loader)) == len(val)
    shutil.move(os.path.join(root, "val"), tmp_path / "away")
    served = []
    with pytest.raises(FileNotFoundError):
        for batch in loader:
            served += batch["index"].tolist()
    assert served == [0, 1]

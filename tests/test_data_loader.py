"""training/data/loader.py: decoding (RGB on white, EXIF turns), resize and crop, bucket shapes, and
unreadable images skipped and counted or named."""

from __future__ import annotations

from itertools import islice

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import data_cfg, png_bytes, rgb, write_imagefolder
from training.data.buckets import BucketConfig
from training.data.loader import ImageCaptionDataset, collate, eval_loader, train_loader
from training.data.records import DataConfig, DataError, load_records
from training.data.sampler import BatchStream


def test_the_loader_gives_each_batch_at_its_bucket_shape(mixed_shapes):
    from training.data.buckets import assign_buckets, bucket_sizes
    from training.data.records import load_records

    data = DataConfig(path=str(mixed_shapes), resolution=32, buckets=BucketConfig(enabled=True))
    records = load_records(mixed_shapes, data)
    sizes = bucket_sizes(data.buckets, 32, 4)
    bucket_of = assign_buckets([row["image"] for row in records], sizes)
    shapes = set()
    for batch in islice(iter(train_loader(records, data, BatchStream(len(records), 8, seed=0, sizes=sizes, bucket_of=bucket_of))), 12):
        (bucket,) = {bucket_of[i] for i in batch["index"]}
        assert tuple(batch["pixel_values"].shape) == (8, 3, *sizes[bucket])
        shapes.add(tuple(batch["pixel_values"].shape[2:]))
    assert shapes == {(48, 20), (32, 32), (20, 48)}


def test_transparent_pixels_go_onto_white_and_modes_become_rgb(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    grey = Image.new("L", (8, 8), 128)
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([10, 20, 30] * 256)
    root = write_imagefolder(tmp_path / "d", {"a.png": rgba, "b.png": grey, "c.png": pal})
    ds = ImageCaptionDataset(load_records(root, data_cfg(root)), data_cfg(root, resolution=8))
    by_name = {ds.records[i]["image"].rsplit("/", 1)[-1]: ds[i]["pixel_values"] for i in range(3)}
    a = by_name["a.png"]
    assert torch.allclose(a[:, 4, 4], torch.ones(3))  # transparent -> white
    assert torch.allclose(a[:, 0, 0], torch.tensor([-1.0, -1.0, 1.0]))  # opaque blue kept
    assert torch.allclose(by_name["b.png"][:, 0, 0], torch.full((3,), 128 / 127.5 - 1), atol=1e-6)
    assert torch.allclose(by_name["c.png"][:, 0, 0], torch.tensor([10, 20, 30]) / 127.5 - 1, atol=1e-6)


def test_resize_and_center_crop_non_square(tmp_path):
    img = Image.new("RGB", (64, 32), (0, 0, 0))
    img.paste((255, 255, 255), (8, 0, 56, 32))  # white centre band, black sides
    root = write_imagefolder(tmp_path / "d", {"a.png": img})
    x = ImageCaptionDataset(load_records(root, data_cfg(root)), data_cfg(root, resolution=16))[0]["pixel_values"]
    assert x.shape == (3, 16, 16)
    assert x.min() > 0.9  # the crop kept only the centre band


def test_bad_images_are_skipped_and_counted(tmp_path):
    images = {f"{i}.png": rgb() for i in range(6)}
    images["broken.png"] = b"not an image at all"
    images["truncated.png"] = png_bytes()[:40]
    root = write_imagefolder(tmp_path / "d", images, {k: k for k in images})
    cfg = data_cfg(root, resolution=8)
    batches = list(eval_loader(load_records(root, cfg), cfg, batch_size=8))
    assert len(batches) == 1
    b = batches[0]
    assert b["pixel_values"].shape[0] == 6
    assert sorted(p.rsplit("/", 1)[-1] for p in b["bad_files"]) == ["broken.png", "truncated.png"]


def test_bad_image_is_an_error_naming_the_file_when_asked(tmp_path):
    root = write_imagefolder(tmp_path / "d", {"ok.png": rgb(), "broken.png": b"junk"}, {"ok.png": "a", "broken.png": "b"})
    cfg = data_cfg(root, resolution=8, on_bad_image="error")
    with pytest.raises(DataError, match="broken.png"):
        list(eval_loader(load_records(root, cfg), cfg, batch_size=2))


def test_collate_with_all_items_bad():
    out = collate([{"bad": "x.png"}])
    assert out["pixel_values"].numel() == 0 and out["bad_files"] == ["x.png"]


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (8, 4), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 4, 4))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "r.jpg", exif=exif, quality=100)
    from training.data.loader import open_rgb

    shown = open_rgb(str(tmp_path / "r.jpg"))
    assert shown.size == (4, 8)  # portrait after applying the orientation
    # turned clockwise, the left (blue) half is on top; JPEG moves a colour by a few levels
    top, bottom = np.asarray(shown)[:3].reshape(-1, 3).mean(0), np.asarray(shown)[5:].reshape(-1, 3).mean(0)
    assert np.abs(top - (0, 0, 255)).max() < 40 and np.abs(bottom - (255, 0, 0)).max() < 40, (top, bottom)

import io
import json

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import write_imagefolder
from training.data import (
    DataConfig,
    DataError,
    ImageCaptionDataset,
    ResumableBatchSampler,
    collate,
    eval_loader,
    load_records,
    train_loader,
)
from training.prepare_data import heldout


def rgb(color=(255, 0, 0), size=(32, 32)):
    return Image.new("RGB", size, color)


def cfg_for(path, **kw):
    return DataConfig(path=str(path), **kw)


def test_imagefolder_with_captions(tmp_path):
    root = write_imagefolder(tmp_path / "d", {"a.png": rgb(), "sub/b.png": rgb((0, 255, 0))},
                             {"a.png": "red square", "sub/b.png": "green square"})
    recs = load_records(root, cfg_for(root))
    assert len(recs) == 2 and sorted(recs["text"]) == ["green square", "red square"]
    item = ImageCaptionDataset(recs, cfg_for(root, resolution=16))[0]
    assert item["pixel_values"].shape == (3, 16, 16)
    assert item["pixel_values"].min() >= -1 and item["pixel_values"].max() <= 1


def test_imagefolder_without_captions_and_split_folders(tmp_path):
    write_imagefolder(tmp_path / "d" / "train", {"a.png": rgb(), "b.jpg": rgb()})
    write_imagefolder(tmp_path / "d" / "test", {"c.png": rgb()})
    root = tmp_path / "d"
    train = load_records(root, cfg_for(root))
    test = load_records(root, cfg_for(root), split="test")
    assert len(train) == 2 and len(test) == 1 and set(train["text"]) == {""}
    with pytest.raises(DataError, match="no 'valid' split"):
        load_records(root, cfg_for(root), split="valid")


def test_configurable_caption_column(tmp_path):
    root = tmp_path / "d"
    write_imagefolder(root, {"a.png": rgb()})
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "caption": "hi"}) + "\n")
    assert load_records(root, cfg_for(root, caption_column="caption"))["text"] == ["hi"]
    with pytest.raises(DataError, match="caption_column='text'.*caption"):
        load_records(root, cfg_for(root))


def test_transparent_pixels_go_onto_white_and_modes_become_rgb(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    grey = Image.new("L", (8, 8), 128)
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([10, 20, 30] * 256)
    root = write_imagefolder(tmp_path / "d", {"a.png": rgba, "b.png": grey, "c.png": pal})
    ds = ImageCaptionDataset(load_records(root, cfg_for(root)), cfg_for(root, resolution=8))
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
    x = ImageCaptionDataset(load_records(root, cfg_for(root)), cfg_for(root, resolution=16))[0]["pixel_values"]
    assert x.shape == (3, 16, 16)
    assert x.min() > 0.9  # the crop kept only the centre band


def test_random_flip_is_off_by_default_and_deterministic_when_on():
    assert DataConfig().random_flip is False
    s1 = list(zip(range(3), ResumableBatchSampler(40, 4, seed=1, random_flip=True)))
    s2 = list(zip(range(3), ResumableBatchSampler(40, 4, seed=1, random_flip=True)))
    assert s1 == s2 and any(f for _, b in s1 for _, f in b)
    assert not any(f for _, b in zip(range(5), ResumableBatchSampler(40, 4, seed=1)) for _, f in b)


def _png_bytes():
    buf = io.BytesIO()
    rgb().save(buf, format="PNG")
    return buf.getvalue()


def test_bad_images_are_skipped_and_counted(tmp_path):
    images = {f"{i}.png": rgb() for i in range(6)}
    images["broken.png"] = b"not an image at all"
    images["truncated.png"] = _png_bytes()[:40]
    root = write_imagefolder(tmp_path / "d", images, {k: k for k in images})
    cfg = cfg_for(root, resolution=8)
    batches = list(eval_loader(load_records(root, cfg), cfg, batch_size=8))
    assert len(batches) == 1
    b = batches[0]
    assert b["pixel_values"].shape[0] == 6
    assert sorted(p.rsplit("/", 1)[-1] for p in b["bad_files"]) == ["broken.png", "truncated.png"]


def test_bad_image_is_an_error_naming_the_file_when_asked(tmp_path):
    root = write_imagefolder(tmp_path / "d", {"ok.png": rgb(), "broken.png": b"junk"}, {"ok.png": "a", "broken.png": "b"})
    cfg = cfg_for(root, resolution=8, on_bad_image="error")
    with pytest.raises(DataError, match="broken.png"):
        list(eval_loader(load_records(root, cfg), cfg, batch_size=2))


def test_missing_folder_and_empty_dataset(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_records(tmp_path / "nope", cfg_for(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        load_records(tmp_path / "empty", cfg_for(tmp_path / "empty"))


def test_metadata_naming_a_missing_file(tmp_path):
    root = write_imagefolder(tmp_path / "d", {"a.png": rgb()}, {"a.png": "x", "gone.png": "y"})
    with pytest.raises(DataError, match="gone.png.*does not exist"):
        load_records(root, cfg_for(root))


@pytest.mark.parametrize("name", ["../outside.png", "/etc/passwd", "sub/../../x.png"])
def test_file_name_escaping_the_folder_is_refused(tmp_path, name):
    write_imagefolder(tmp_path, {"outside.png": rgb()})
    root = write_imagefolder(tmp_path / "d", {"a.png": rgb()})
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": name, "text": "x"}) + "\n")
    with pytest.raises(DataError, match="escapes the dataset folder"):
        load_records(root, cfg_for(root))


def test_saved_dataset_with_custom_columns(tmp_path):
    arr = np.zeros((8, 8, 3), np.uint8)
    arr[..., 1] = 255
    ds = datasets.Dataset.from_dict({"img": [Image.fromarray(arr)] * 3, "caption": ["g1", "g2", "g3"]})
    ds = ds.cast_column("img", datasets.Image())
    ds.save_to_disk(str(tmp_path / "saved"))
    cfg = cfg_for(tmp_path / "saved", image_column="img", caption_column="caption", resolution=8)
    recs = load_records(tmp_path / "saved", cfg)
    item = ImageCaptionDataset(recs, cfg)[1]
    assert item["text"] == "g2" and torch.allclose(item["pixel_values"][:, 0, 0], torch.tensor([-1.0, 1.0, -1.0]))
    with pytest.raises(DataError, match="image_column='image'.*img"):
        load_records(tmp_path / "saved", cfg_for(tmp_path / "saved"))


def test_sampler_resumes_mid_stream_and_splits_ranks():
    full = [b for _, b in zip(range(12), ResumableBatchSampler(30, 4, seed=7))]
    resumed = [b for _, b in zip(range(5), ResumableBatchSampler(30, 4, seed=7, start=7))]
    assert resumed == full[7:12]
    # epochs are permutations: 7 batches of 4 from 30 items, no repeats within an epoch
    epoch0 = [i for b in full[:7] for i, _ in b]
    assert len(set(epoch0)) == 28
    # two ranks with half the batch see exactly the global batch of one rank
    r0 = [b for _, b in zip(range(3), ResumableBatchSampler(30, 2, seed=7, rank=0, world_size=2))]
    r1 = [b for _, b in zip(range(3), ResumableBatchSampler(30, 2, seed=7, rank=1, world_size=2))]
    for g, a, b in zip(full[:3], r0, r1):
        assert sorted(g) == sorted(a + b)


def test_fewer_images_than_a_batch_is_a_clear_error(tmp_path):
    root = write_imagefolder(tmp_path / "d", {"a.png": rgb(), "b.png": rgb()})
    cfg = cfg_for(root)
    with pytest.raises(DataError, match="fewer than one global batch"):
        train_loader(load_records(root, cfg), cfg, batch_size=4, seed=0)


def test_collate_with_all_items_bad():
    out = collate([{"bad": "x.png"}])
    assert out["pixel_values"].numel() == 0 and out["bad_files"] == ["x.png"]


def test_prepared_openmoji_is_captioned_and_split_deterministically(openmoji_small):
    train = [json.loads(line) for line in (openmoji_small / "train" / "metadata.jsonl").read_text().splitlines()]
    test = [json.loads(line) for line in (openmoji_small / "test" / "metadata.jsonl").read_text().splitlines()]
    assert len(train) > 100 and all(r["text"] and not r["text"].startswith(":") for r in train)
    assert {r["file_name"] for r in train}.isdisjoint({r["file_name"] for r in test})
    assert all(heldout(r["file_name"][:-4]) for r in test) and not any(heldout(r["file_name"][:-4]) for r in train)
    img = Image.open(openmoji_small / "train" / train[0]["file_name"])
    assert img.size == (32, 32) and img.mode == "RGB"
    assert (openmoji_small / "LICENSE.md").read_text().count("CC BY-SA 4.0") >= 1


def test_prepare_openmoji_at_64(tmp_path):
    from training.prepare_data import prepare_openmoji

    counts = prepare_openmoji(tmp_path / "om64", 64, limit=12)
    files = sorted((tmp_path / "om64").rglob("*.png"))
    assert sum(counts.values()) == len(files) > 0
    assert all(Image.open(f).size == (64, 64) for f in files)


def test_held_out_split_folder_is_never_part_of_the_root_train_split(tmp_path):
    root = write_imagefolder(tmp_path / "d", {"a.png": rgb(), "b.png": rgb(), "test/t.png": rgb(), "more/c.png": rgb()})
    train = load_records(root, cfg_for(root))
    names = sorted(p.rsplit("/", 1)[-1] for p in train["image"])
    assert names == ["a.png", "b.png", "c.png"]  # test/ excluded, other subfolders kept
    assert [p.rsplit("/", 1)[-1] for p in load_records(root, cfg_for(root), split="test")["image"]] == ["t.png"]


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (8, 4), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 4, 4))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "r.jpg", exif=exif, quality=100)
    from training.data import open_rgb

    shown = open_rgb(str(tmp_path / "r.jpg"))
    assert shown.size == (4, 8)  # portrait after applying the orientation


def test_prepare_openmoji_with_a_split_left_empty(tmp_path):
    from training.prepare_data import prepare_openmoji

    counts = prepare_openmoji(tmp_path / "om", 16, limit=3)
    assert counts["train"] + counts["test"] > 0
    assert (tmp_path / "om" / "train" / "metadata.jsonl").is_file() and (tmp_path / "om" / "test" / "metadata.jsonl").is_file()


def test_caption_sources_and_errors(tmp_path):
    from training.data import DataConfig, DataError, load_records

    imgs = {f"{i}.png": Image.new("RGB", (16, 16), (i * 30, 0, 0)) for i in range(3)}
    folder = write_imagefolder(tmp_path / "txt", imgs)
    for i in range(3):
        (folder / f"{i}.txt").write_text(f"caption {i}\n")
    cfg = DataConfig(path=str(folder))
    assert sorted(load_records(folder, cfg, captions=True)["text"]) == ["caption 0", "caption 1", "caption 2"]
    (folder / "2.txt").unlink()
    with pytest.raises(DataError, match="1 of 3 images .* have no caption"):
        load_records(folder, cfg, captions=True)
    assert set(load_records(folder, DataConfig(path=str(folder), caption="a sks dog"), captions=True)["text"]) == {"a sks dog"}
    import datasets

    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"image": [str(folder / "0.png")], "prompt": ["x"]}).save_to_disk(str(saved))
    with pytest.raises(DataError, match="data.caption_column='text' is not a column of .*; columns: image, prompt"):
        load_records(saved, DataConfig(path=str(saved)), captions=True)
    assert load_records(saved, DataConfig(path=str(saved), caption_column="prompt"), captions=True)["text"] == ["x"]

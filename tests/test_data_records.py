"""training/data/records.py: imagefolders, metadata.jsonl and .txt captions, saved datasets, split folders,
and the errors that name the bad input."""

import json

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import data_cfg, rgb, write_imagefolder
from training.data.loader import ImageCaptionDataset
from training.data.records import DataConfig, DataError, load_records


def test_imagefolder_with_captions(tmp_path):
    root = write_imagefolder(tmp_path / "d", {"a.png": rgb(), "sub/b.png": rgb((0, 255, 0))},
                             {"a.png": "red square", "sub/b.png": "green square"})
    recs = load_records(root, data_cfg(root))
    assert len(recs) == 2 and sorted(recs["text"]) == ["green square", "red square"]
    item = ImageCaptionDataset(recs, data_cfg(root, resolution=16))[0]
    assert item["pixel_values"].shape == (3, 16, 16)
    assert item["pixel_values"].min() >= -1 and item["pixel_values"].max() <= 1


def test_imagefolder_without_captions_and_split_folders(tmp_path):
    write_imagefolder(tmp_path / "d" / "train", {"a.png": rgb(), "b.jpg": rgb()})
    write_imagefolder(tmp_path / "d" / "test", {"c.png": rgb()})
    root = tmp_path / "d"
    train = load_records(root, data_cfg(root))
    test = load_records(root, data_cfg(root), split="test")
    assert len(train) == 2 and len(test) == 1 and set(train["text"]) == {""}
    with pytest.raises(DataError, match="no 'valid' split"):
        load_records(root, data_cfg(root), split="valid")


def test_configurable_caption_column(tmp_path):
    root = tmp_path / "d"
    write_imagefolder(root, {"a.png": rgb()})
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "caption": "hi"}) + "\n")
    assert load_records(root, data_cfg(root, caption_column="caption"))["text"] == ["hi"]
    with pytest.raises(DataError, match="caption_column='text'.*caption"):
        load_records(root, data_cfg(root))


def test_missing_folder_and_empty_dataset(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_records(tmp_path / "nope", data_cfg(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        load_records(tmp_path / "empty", data_cfg(tmp_path / "empty"))


def test_metadata_naming_a_missing_file(tmp_path):
    root = write_imagefolder(tmp_path / "d", {"a.png": rgb()}, {"a.png": "x", "gone.png": "y"})
    with pytest.raises(DataError, match="gone.png.*does not exist"):
        load_records(root, data_cfg(root))


@pytest.mark.parametrize("name", ["../outside.png", "/etc/passwd", "sub/../../x.png"])
def test_file_name_escaping_the_folder_is_refused(tmp_path, name):
    write_imagefolder(tmp_path, {"outside.png": rgb()})
    root = write_imagefolder(tmp_path / "d", {"a.png": rgb()})
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": name, "text": "x"}) + "\n")
    with pytest.raises(DataError, match="escapes the dataset folder"):
        load_records(root, data_cfg(root))


def test_saved_dataset_with_custom_columns(tmp_path):
    arr = np.zeros((8, 8, 3), np.uint8)
    arr[..., 1] = 255
    ds = datasets.Dataset.from_dict({"img": [Image.fromarray(arr)] * 3, "caption": ["g1", "g2", "g3"]})
    ds = ds.cast_column("img", datasets.Image())
    ds.save_to_disk(str(tmp_path / "saved"))
    cfg = data_cfg(tmp_path / "saved", image_column="img", caption_column="caption", resolution=8)
    recs = load_records(tmp_path / "saved", cfg)
    item = ImageCaptionDataset(recs, cfg)[1]
    assert item["text"] == "g2" and torch.allclose(item["pixel_values"][:, 0, 0], torch.tensor([-1.0, 1.0, -1.0]))
    with pytest.raises(DataError, match="image_column='image'.*img"):
        load_records(tmp_path / "saved", data_cfg(tmp_path / "saved"))


def test_held_out_split_folder_is_never_part_of_the_root_train_split(tmp_path):
    root = write_imagefolder(tmp_path / "d", {"a.png": rgb(), "b.png": rgb(), "test/t.png": rgb(), "more/c.png": rgb()})
    train = load_records(root, data_cfg(root))
    names = sorted(p.rsplit("/", 1)[-1] for p in train["image"])
    assert names == ["a.png", "b.png", "c.png"]  # test/ excluded, other subfolders kept
    assert [p.rsplit("/", 1)[-1] for p in load_records(root, data_cfg(root), split="test")["image"]] == ["t.png"]


def test_caption_sources_and_errors(tmp_path):
    from training.data.records import DataError, load_records

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

"""training/data/builtin.py: the OpenMoji dataset, captioned and split the same on every machine."""

import json

from PIL import Image

from training.data.builtin import heldout


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
    from training.data.builtin import prepare_openmoji

    counts = prepare_openmoji(tmp_path / "om64", 64, limit=12)
    files = sorted((tmp_path / "om64").rglob("*.png"))
    assert sum(counts.values()) == len(files) > 0
    assert all(Image.open(f).size == (64, 64) for f in files)


def test_prepare_openmoji_with_a_split_left_empty(tmp_path):
    from training.data.builtin import prepare_openmoji

    counts = prepare_openmoji(tmp_path / "om", 16, limit=3)
    assert counts["train"] + counts["test"] > 0
    assert (tmp_path / "om" / "train" / "metadata.jsonl").is_file() and (tmp_path / "om" / "test" / "metadata.jsonl").is_file()

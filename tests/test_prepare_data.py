"""prepare_data: users' folders checked whole, then written as sized imagefolders."""

import json

import pytest
from PIL import Image

from tests.conftest import write_imagefolder
from training.data.buckets import make_buckets, nearest_bucket


def test_prepare_folder_checks_everything_then_writes_a_sized_imagefolder(tmp_path, capsys):
    from training.data.records import DataError
    from training.prepare_data import main, prepare_folder

    imgs = {"a.jpg": Image.new("RGB", (40, 20), (200, 0, 0)), "b.png": Image.new("RGBA", (8, 8), (0, 0, 255, 0))}
    src = write_imagefolder(tmp_path / "src", imgs)
    (src / "a.txt").write_text("a red thing\n")
    (src / "b.txt").write_text("a see-through thing")
    counts = prepare_folder(src, tmp_path / "out", 16)
    assert counts == {"train": 2, "upscaled": 1}
    rows = [json.loads(line) for line in (tmp_path / "out" / "train" / "metadata.jsonl").read_text().splitlines()]
    assert sorted(r["text"] for r in rows) == ["a red thing", "a see-through thing"]
    for r in rows:
        img = Image.open(tmp_path / "out" / "train" / r["file_name"])
        assert img.size == (16, 16) and img.mode == "RGB"
    (src / "c.png").write_bytes(b"not a png")
    (src / "c.txt").write_text("broken")
    with pytest.raises(DataError, match="cannot read image '.*c.png'"):
        prepare_folder(src, tmp_path / "out2", 16)
    assert not (tmp_path / "out2").exists()  # nothing written when any image is bad
    (src / "c.png").unlink()
    (src / "b.txt").unlink()
    with pytest.raises(SystemExit):  # a missing caption is named before anything is written
        main(["folder", "--src", str(src), "--size", "16", "--out", str(tmp_path / "out3")])
    assert "have no caption" in capsys.readouterr().err and not (tmp_path / "out3").exists()
    main(["folder", "--src", str(src), "--size", "16", "--out", str(tmp_path / "out4"), "--caption", "a sks thing"])
    assert {json.loads(line)["text"] for line in (tmp_path / "out4" / "train" / "metadata.jsonl").read_text().splitlines()} == {"a sks thing"}


def test_prepare_data_folder_keeps_aspect_ratios_when_asked_and_reports_the_bucket_histogram(tmp_path, capsys):
    from tests.conftest import write_imagefolder
    from training.prepare_data import main

    sizes = {"tall.png": (60, 200), "wide.png": (300, 90), "square.png": (80, 80), "photo.png": (640, 427), "small.png": (20, 14)}
    images = {name: Image.new("RGB", wh, (40 * i, 90, 200)) for i, (name, wh) in enumerate(sizes.items())}
    write_imagefolder(tmp_path / "src", images, {name: name.split(".")[0] for name in sizes})
    main(["folder", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--size", "32", "--keep-aspect"])
    counts = json.loads(capsys.readouterr().out.splitlines()[-1])
    buckets = make_buckets(32, 8, 16, 64, 8)
    assert sum(counts["buckets"].values()) == counts["train"] == 5 and counts["upscaled"] == 1  # small.png
    rows = [json.loads(line) for line in (tmp_path / "out" / "train" / "metadata.jsonl").read_text().splitlines()]
    for row in rows:
        w, h = sizes[row["text"] + ".png"]
        out = Image.open(tmp_path / "out" / "train" / row["file_name"])
        bh, bw = buckets[nearest_bucket(w, h, buckets)]
        assert out.width >= bw and out.height >= bh and (out.width == bw or out.height == bh)  # just covers its bucket
        assert abs(out.width / out.height - w / h) < 0.05 * (w / h) + 1 / min(out.size)  # the aspect ratio kept
    assert list(counts["buckets"].items()) == [("64x16", 1), ("32x32", 1), ("24x40", 2), ("16x64", 1)]  # tallest first

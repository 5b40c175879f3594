"""prepare_data: users' folders checked whole, then written as sized imagefolders."""

import json

import pytest
from PIL import Image

from tests.conftest import write_imagefolder


def test_prepare_folder_checks_everything_then_writes_a_sized_imagefolder(tmp_path, capsys):
    from training.data import DataError
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

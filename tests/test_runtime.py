"""runtime/: atomic writes keep the old copy on failure; images come to RGB on white; the CPU set-up is explicit."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from runtime.files import atomic_dir, write_json_atomic
from runtime.images import to_rgb


def test_a_failed_atomic_write_leaves_the_previous_folder_whole_and_no_temporary(tmp_path):
    target = tmp_path / "export"
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "weights").write_text("half of v2")
            raise RuntimeError("killed mid-write")
    assert (target / "weights").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("v2")
    assert (target / "weights").read_text() == "v2" and sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_json_is_replaced_whole(tmp_path):
    path = tmp_path / "sub" / "metrics.json"
    write_json_atomic(path, {"psnr": 1.0})
    write_json_atomic(path, {"psnr": 2.0})
    assert json.loads(path.read_text()) == {"psnr": 2.0} and [p.name for p in path.parent.iterdir()] == ["metrics.json"]


def test_transparent_pixels_land_on_white_and_opaque_ones_keep_their_colour():
    img = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    img.putpixel((1, 0), (200, 10, 10, 255))
    rgb = to_rgb(img)
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (255, 255, 255) and rgb.getpixel((1, 0)) == (200, 10, 10)


def test_importing_the_packages_configures_nothing(tmp_path):
    """The CPU set-up runs where an entry point calls runtime.configure(), not as an import's side effect."""
    import subprocess
    import sys

    code = "import autoencoder, ldm, training, runtime.hardware as h; print(h._configured)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


def test_configure_keeps_more_onednn_kernels_unless_the_user_chose(tmp_path):
    """Buckets multiply the input shapes; with oneDNN's default 1024 kept kernels stage 1 rebuilt
    kernels every step (17.1 vs 19.2 images/s, runtime.hardware.configure_cpu)."""
    import os
    import subprocess
    import sys

    code = "import os, runtime; runtime.configure(); print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])"
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    run = lambda env: subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout  # noqa: E731
    assert run(env).strip() == "4096" and run({**env, "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "77"}).strip() == "77"

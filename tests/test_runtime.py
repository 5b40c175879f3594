"""runtime/: atomic writes keep the old copy on failure; images come to RGB on white; the CPU set-up is
explicit; the bf16 decision (a probe under load is not kept, a verdict against the CPU family is measured
again, LDM_CPU_BF16 overrides it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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

    code = "import autoencoder, ldm, training, runtime.hardware as h; print(h._configured)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


def test_configure_keeps_more_onednn_kernels_unless_the_user_chose(tmp_path):
    """Buckets multiply the input shapes; with oneDNN's default 1024 kept kernels stage 1 rebuilt
    kernels every step (17.1 vs 19.2 images/s, runtime.hardware.configure_cpu)."""
    import subprocess

    code = "import os, runtime; runtime.configure(); print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])"
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    run = lambda env: subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout  # noqa: E731
    assert run(env).strip() == "4096" and run({**env, "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "77"}).strip() == "77"


@pytest.fixture
def probe(monkeypatch, tmp_path):
    """runtime.hardware with a scripted probe, an empty per-boot cache and a CPU that has bf16 units."""
    from runtime import hardware

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("LDM_CPU_BF16", raising=False)
    monkeypatch.setattr(hardware, "_cpu_flags", lambda: {"avx512_bf16"})
    monkeypatch.setattr(hardware.platform, "system", lambda: "Linux")
    results: list[dict] = []
    calls = []
    monkeypatch.setattr(hardware, "_probe_speed", lambda: calls.append(1) or results.pop(0))
    hardware.bf16_decision.cache_clear()
    yield hardware, results, calls
    hardware.bf16_decision.cache_clear()


def test_a_probe_taken_under_load_is_used_once_and_not_kept(probe, monkeypatch):
    hardware, results, calls = probe
    monkeypatch.setattr(hardware, "_expected_fast", lambda: None)
    results += [{"speedup": 0.56, "spread": 0.4, "cpu_share": 0.35}, {"speedup": 1.9, "spread": 0.05, "cpu_share": 0.97}]
    speedup, how = hardware.bf16_decision()
    assert speedup == 0.56 and "the CPU was busy (probe got 35% of it): not kept" in how
    hardware.bf16_decision.cache_clear()  # the next process
    assert hardware.bf16_decision() == (1.9, "bf16 probe 1.90x")
    hardware.bf16_decision.cache_clear()
    assert hardware.bf16_decision()[1] == "bf16 probe 1.90x (measured earlier this boot)" and len(calls) == 2


def test_a_verdict_against_the_cpu_family_is_measured_again(probe, monkeypatch):
    hardware, results, calls = probe
    monkeypatch.setattr(hardware, "_expected_fast", lambda: True)  # e.g. an AMD EPYC with AVX512-BF16
    results += [{"speedup": 0.6, "spread": 0.5, "cpu_share": 0.9}, {"speedup": 2.2, "spread": 0.05, "cpu_share": 0.98}]
    assert hardware.bf16_decision()[0] == 2.2 and len(calls) == 2


def test_the_bf16_decision_can_be_overridden_and_the_run_says_why(probe, monkeypatch):
    from training.config import MixedPrecision

    hardware, _, calls = probe
    monkeypatch.setenv("LDM_CPU_BF16", "slow")
    assert MixedPrecision.auto.accelerate_name("cpu") == "no" and calls == []
    assert MixedPrecision.auto.reason("cpu") == "auto: LDM_CPU_BF16=slow (< 1.3x)"
    assert MixedPrecision.bf16.reason("cpu") == "train.mixed_precision=bf16"

"""training/data/buckets.py: the bucket set, each image's bucket and crop, and the bf16 narrow-map refusal."""

from __future__ import annotations

import math
import random

import pytest
import torch
from PIL import Image

from runtime.errors import InputError
from training.data.buckets import check_buckets, cover_and_crop, kept_area, make_buckets, nearest_bucket


@pytest.mark.parametrize("resolution,divisor,lo,hi,step", [(32, 8, 16, 64, 8), (64, 8, 32, 128, 8), (512, 64, 256, 1024, 64),
                                                           (1024, 8, 512, 2048, 64)])  # fmt: skip
def test_buckets_are_divisible_near_the_area_include_the_square_and_none_contains_another(resolution, divisor, lo, hi, step):
    buckets = make_buckets(resolution, divisor, lo, hi, step)
    assert (resolution, resolution) in buckets and len(set(buckets)) == len(buckets) > 1
    for h, w in buckets:
        assert h % divisor == 0 and w % divisor == 0 and h % step == 0 and w % step == 0 and lo <= min(h, w) and max(h, w) <= hi
        assert h * w <= resolution**2
        assert (w, h) in buckets  # portrait for every landscape
        assert not any((h2 >= h and w2 >= w) for h2, w2 in buckets if (h2, w2) != (h, w))
        assert h * (w + step) > resolution**2 or w + step > hi  # no wider bucket of that height fits the area
    ratios = [w / h for h, w in buckets]
    assert ratios == sorted(ratios)


def test_the_32_pixel_set_is_what_the_docstring_says():
    assert make_buckets(32, 8, 16, 64, 8) == [(64, 16), (40, 24), (32, 32), (24, 40), (16, 64)]


def test_bad_bucket_settings_name_the_key():
    with pytest.raises(InputError, match="data.buckets.step=12 must be a multiple of the total downsampling 8"):
        make_buckets(32, 8, 16, 64, 12)
    with pytest.raises(InputError, match="min_side=48 <= data.resolution=32"):
        make_buckets(32, 8, 48, 64, 8)
    with pytest.raises(InputError, match=r"data.buckets.sizes: \[30, 32\] is not a \[height, width\] pair of multiples"):
        check_buckets([[32, 32], [30, 32]], 8)
    assert check_buckets([[32, 48], [48, 32]], 8) == [(48, 32), (32, 48)]


def test_each_image_goes_to_the_bucket_of_the_nearest_aspect_ratio():
    buckets = make_buckets(64, 8, 32, 128, 8)
    rng = random.Random(0)
    for _ in range(500):
        w, h = rng.randint(10, 4000), rng.randint(10, 4000)
        best = min(abs(math.log(w / h) - math.log(bw / bh)) for bh, bw in buckets)
        assert abs(math.log(w / h) - math.log(buckets[nearest_bucket(w, h, buckets)][1] / buckets[nearest_bucket(w, h, buckets)][0])) == best
    assert buckets[nearest_bucket(640, 427, buckets)][1] > buckets[nearest_bucket(640, 427, buckets)][0]  # landscape
    assert buckets[nearest_bucket(100, 100, buckets)] == (64, 64)


def test_an_image_is_resized_to_cover_its_bucket_and_centre_cropped_by_the_rest():
    img = Image.new("RGB", (300, 100))
    out, (top, left) = cover_and_crop(img, (24, 40))
    assert out.size == (40, 24) and top == 0 and left == (72 - 40) // 2  # 300x100 -> 72x24, 32 columns cut
    assert kept_area(300, 100, (24, 40)) == pytest.approx((40 / 24) / 3)
    assert kept_area(300, 100, (24, 40)) > kept_area(300, 100, (32, 32))  # more than a square crop keeps


def test_a_turned_phone_photo_goes_to_the_bucket_of_its_shape_as_seen(tmp_path):
    from training.data.buckets import image_size
    from training.data.loader import open_rgb

    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait (turned 90 degrees)
    Image.new("RGB", (400, 200)).save(tmp_path / "phone.jpg", exif=exif)
    assert image_size(str(tmp_path / "phone.jpg")) == open_rgb(str(tmp_path / "phone.jpg")).size == (200, 400)


def test_buckets_that_bf16_computes_wrongly_on_this_cpu_are_refused_in_training_and_generation(monkeypatch):
    """On a CPU whose bf16 stride-2 convolutions go wrong on maps under 4 pixels wide (probed;
    the AMX Xeon VM is one), a bucket or a generated size that makes such maps is an error naming
    it and the fix; elsewhere it runs. The rule: the last downsampling convolution sees the image
    shrunk by half the total downsampling."""
    from types import SimpleNamespace

    import runtime.narrow_maps
    import training.data.buckets as buckets
    from runtime import NARROW_MAP, bf16_wrong_sizes
    from runtime.errors import InputError as Refused
    from tests.conftest import tiny_pipeline

    assert NARROW_MAP == 4
    bf16_cpu, fp32_cpu = (SimpleNamespace(mixed_precision=p, device=torch.device("cpu")) for p in ("bf16", "no"))
    monkeypatch.setattr(runtime.narrow_maps, "bf16_narrow_maps_ok", lambda: False)
    assert bf16_wrong_sizes(make_buckets(32, 16, 16, 64, 16), 16) == [(64, 16), (16, 64)]  # 16 * 2 // 16 = 2 wide
    assert bf16_wrong_sizes(make_buckets(64, 16, 32, 128, 16), 16) == []  # the 64-pixel defaults: 32 * 2 // 16 = 4
    buckets.refuse_narrow_buckets([(64, 16), (32, 32)], 16, "the U-Net", 32, fp32_cpu)  # fp32 computes them right
    for ok in (True, False):
        monkeypatch.setattr(runtime.narrow_maps, "bf16_narrow_maps_ok", lambda ok=ok: ok)
        if ok:
            buckets.refuse_narrow_buckets([(64, 16), (32, 32)], 16, "the U-Net", 32, bf16_cpu)
        else:
            with pytest.raises(Refused, match=r"data.buckets: 64x16 \(height x width\) would give maps 2 pixels wide .* at least 32: a list such as "
                                              r"data.buckets.sizes=\[\[48,32\],\[32,32\],\[32,48\]\], or .*mixed_precision=fp32"):  # fmt: skip
                buckets.refuse_narrow_buckets([(64, 16), (32, 32)], 16, "the U-Net", 32, bf16_cpu)  # min_side=32 would leave only 32x32
            with pytest.raises(Refused, match=r"at least 32: data.buckets.min_side=32, or a list"):
                buckets.refuse_narrow_buckets([(128, 16), (64, 64)], 16, "the U-Net", 64, bf16_cpu)

    pipe = tiny_pipeline().prepare_for_inference(device="cpu", dtype="bf16")  # total downsampling 8
    run = lambda h, w: pipe(["sun"], height=h, width=w, num_inference_steps=1, output_type="latent").images  # noqa: E731
    monkeypatch.setattr(runtime.narrow_maps, "bf16_narrow_maps_ok", lambda: False)
    with pytest.raises(Refused, match=r"8x32 \(height x width\) would give maps 2 pixels wide .* sides of at least 16, or fp32"):
        run(8, 32)
    assert run(16, 32).shape[2:] == (4, 8)  # 16 * 2 // 8 = 4: fine
    monkeypatch.setattr(runtime.narrow_maps, "bf16_narrow_maps_ok", lambda: True)
    assert run(8, 32).shape[2:] == (2, 8)

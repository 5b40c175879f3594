"""Aspect-ratio buckets: the bucket set, each image's bucket and crop, a batch sampler that never
mixes shapes, resumes at any batch and is the same for 1 or 2 ranks; both training jobs on a folder
of mixed shapes (the stage-2 cache by bucket, exact resume, 2 ranks = 1 rank)."""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from itertools import islice

import pytest
import torch
from PIL import Image

from runtime.errors import InputError
from training.buckets import BucketBatchSampler, BucketConfig, check_buckets, cover_and_crop, kept_area, make_buckets, nearest_bucket


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


def sampler(bucket_of, batch, **kw):
    return BucketBatchSampler(bucket_of, max(bucket_of) + 1, batch, seed=3, **kw)


def test_batches_never_mix_buckets_and_every_image_is_seen_each_epoch_small_buckets_included():
    bucket_of = [0] * 37 + [1] * 8 + [2] * 3 + [3] * 20  # bucket 2 has fewer images than a batch
    s = sampler(bucket_of, 8)
    epoch = list(islice(iter(s), len(s)))
    assert len(s) == 5 + 1 + 1 + 3
    for batch in epoch:
        assert len(batch) == 8 and len({bucket_of[i] for i, _ in batch}) == 1
    seen = Counter(i for batch in epoch for i, _ in batch)
    assert set(seen) == set(range(len(bucket_of)))  # nothing dropped
    assert s.repeated == [3, 0, 5, 4]  # slots filled by repeating a bucket's own images, reported


def test_a_resumed_stream_and_two_ranks_equal_one_rank():
    bucket_of = [random.Random(1).randrange(4) for _ in range(200)]
    one = list(islice(iter(sampler(bucket_of, 8, random_flip=True)), 60))
    assert list(islice(iter(sampler(bucket_of, 8, start=37, random_flip=True)), 23)) == one[37:]
    ranks = [list(islice(iter(sampler(bucket_of, 4, rank=r, world_size=2, random_flip=True)), 60)) for r in (0, 1)]
    for k in range(60):
        assert sorted(ranks[0][k] + ranks[1][k]) == sorted(one[k])  # the same global batch, split across ranks
    assert one[:len(sampler(bucket_of, 8))] != one[len(sampler(bucket_of, 8)):2 * len(sampler(bucket_of, 8))]  # a new order each epoch


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


# ---- stage 1 on buckets ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixed_shapes(tmp_path_factory):
    """48 captioned images in three shapes (tall, square, wide), with a held-out split."""
    import numpy as np

    from tests.conftest import write_imagefolder

    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("mixed") / "data"
    shapes = [(24, 72), (40, 40), (80, 28)]  # (width, height): tall, square, wide
    for split, n in (("train", 48), ("test", 6)):
        images = {f"{i:03d}.png": Image.fromarray(rng.integers(0, 255, (shapes[i % 3][1], shapes[i % 3][0], 3), dtype=np.uint8))
                  for i in range(n)}  # fmt: skip
        write_imagefolder(root / split, images, {name: "a pattern" for name in images})
    return root


def test_stage_1_trains_on_buckets_and_resumes_exactly(mixed_shapes, tmp_path):
    from safetensors.torch import load_file

    from tests.conftest import fresh_state
    from tests.test_train_autoencoder import tiny_cfg
    from training.train_autoencoder import train as job

    train = fresh_state(job)
    on = ["data.buckets.enabled=true", "train.max_steps=6", "train.checkpoint_every=2", "train.sample_every=100"]
    train(tiny_cfg(mixed_shapes, tmp_path / "full", *on))
    train(tiny_cfg(mixed_shapes, tmp_path / "resumed", *on), stop_after_steps=4)
    train(tiny_cfg(mixed_shapes, tmp_path / "resumed", *on))
    a, b = (load_file(str(tmp_path / r / "vae" / "diffusion_pytorch_model.safetensors")) for r in ("full", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    (event,) = [json.loads(line) for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines() if '"buckets"' in line]
    sizes = dict(zip(event["sizes"], event["images"]))  # tiny autoencoder: f=4, buckets of 32^2 pixels in steps of 4
    assert (sizes["48x20"], sizes["32x32"], sizes["20x48"]) == (16, 16, 16) and sum(event["images"]) == 48  # tall, square, wide


def test_the_loader_gives_each_batch_at_its_bucket_shape(mixed_shapes):
    from training.buckets import assign_buckets, bucket_sizes
    from training.data import DataConfig, load_records, train_loader

    data = DataConfig(path=str(mixed_shapes), resolution=32, buckets=BucketConfig(enabled=True))
    records = load_records(mixed_shapes, data)
    sizes = bucket_sizes(data.buckets, 32, 4)
    bucket_of = assign_buckets([row["image"] for row in records], sizes)
    shapes = set()
    for batch in islice(iter(train_loader(records, data, 8, seed=0, buckets=(sizes, bucket_of))), 12):
        (bucket,) = {bucket_of[i] for i in batch["index"]}
        assert tuple(batch["pixel_values"].shape) == (8, 3, *sizes[bucket])
        shapes.add(tuple(batch["pixel_values"].shape[2:]))
    assert shapes == {(48, 20), (32, 32), (20, 48)}


def test_a_turned_phone_photo_goes_to_the_bucket_of_its_shape_as_seen(tmp_path):
    from training.buckets import image_size
    from training.data import open_rgb

    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait (turned 90 degrees)
    Image.new("RGB", (400, 200)).save(tmp_path / "phone.jpg", exif=exif)
    assert image_size(str(tmp_path / "phone.jpg")) == open_rgb(str(tmp_path / "phone.jpg")).size == (200, 400)


def test_stage_2_caches_each_image_at_its_bucket_resumes_exactly_and_samples_each_shape(mixed_shapes, tiny_vae, tmp_path):
    """MiniLM (frozen: its caption states are cached per bucket too) and random flips. Killed after
    step 3 and relaunched: the same U-Net, bit for bit, as a run that never stopped."""
    from safetensors import safe_open

    from tests.test_train_ldm import cfg_for, train, unet_weights

    on = ["data.buckets.enabled=true", "data.random_flip=true", "model.text_encoder=minilm", "train.max_steps=6",
          "train.checkpoint_every=3", "train.sample_every=6", f"cache.dir={tmp_path / 'cache'}", "cache.shard_size=20"]  # fmt: skip
    train(cfg_for(mixed_shapes, tiny_vae, tmp_path / "full", *on))
    train(cfg_for(mixed_shapes, tiny_vae, tmp_path / "resumed", *on), stop_after_steps=3)
    train(cfg_for(mixed_shapes, tiny_vae, tmp_path / "resumed", *on))
    full, resumed = unet_weights(tmp_path / "full"), unet_weights(tmp_path / "resumed")
    assert all(torch.equal(full[k], resumed[k]) for k in full)

    # the cache: each image's latent at its bucket's shape (tiny autoencoder: f=4; x2 U-Net: buckets in steps of 8)
    (folder,) = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert json.loads((folder / "key.json").read_text())["buckets"] == ["64x16", "40x24", "32x32", "24x40", "16x64"]
    rows = Counter()
    for shard in sorted(folder.glob("shard-*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for name in f.keys():
                tensor, size = name.split("@")
                h, w = map(int, size.split("x"))
                shape = f.get_slice(name).get_shape()
                if tensor in ("moments", "moments_flipped"):
                    assert shape[2:] == [h // 4, w // 4], (name, shape)
                if tensor == "index":
                    rows[size] += shape[0]
                    assert all(i % 3 == {"64x16": 0, "32x32": 1, "16x64": 2}[size] for i in f.get_tensor(name).tolist())
    assert rows == {"64x16": 16, "32x32": 16, "16x64": 16}  # every third image is tall, square, wide
    (event,) = [json.loads(line) for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines() if '"buckets"' in line]
    assert event["sizes"] == ["64x16", "40x24", "32x32", "24x40", "16x64"] and event["images"] == [16, 0, 16, 0, 16]
    grid = Image.open(tmp_path / "full" / "samples" / "step-00000006.png")  # 2 prompts x (tall, square, wide) x 2 images, cells of 64x64, x2
    assert grid.size == (3 * 2 * 64 * 2, 2 * 64 * 2)


def test_the_cache_key_changes_with_the_bucket_set_and_stays_as_it_was_without_buckets(mixed_shapes):
    from training.data import DataConfig, load_records
    from training.latent_cache import _key_name, cache_key

    data = DataConfig(path=str(mixed_shapes))
    records = load_records(mixed_shapes, data)
    square = cache_key("vae", data, records, None)
    keys = {_key_name(k) for k in (square, cache_key("vae", data, records, None, [(32, 32), (16, 64)]),
                                   cache_key("vae", data, records, None, [(32, 32), (24, 40)]))}  # fmt: skip
    assert len(keys) == 3
    from training.latent_cache import dataset_digest

    assert square == {"version": 2, "vae": "vae", "resolution": 32, "images": 54 - 6, "text_encoder": None,  # as before buckets:
                      "transforms": {"resize": "shorter-side bicubic", "crop": "center", "random_flip": False},  # an earlier
                      "dataset": dataset_digest(records)}  # fmt: skip  (square cache is still found)


def test_each_cached_row_is_its_own_images_latent_at_its_bucket_across_uneven_shards(tmp_path):
    """5 tall images, 4 wide and an unreadable file, in shards of 3: one shard holds only tall
    images, one both shapes, one only wide, and the last none readable. Row j of the cache is
    the latent of image source_index[j], at the bucket bucket_of[j] names."""
    import numpy as np

    from autoencoder.latents import encode_moments
    from autoencoder.model import build_autoencoder
    from tests.conftest import write_imagefolder
    from training.data import DataConfig, load_records, open_rgb, to_tensor
    from training.latent_cache import build_latent_cache, load_latent_cache

    rng = np.random.default_rng(0)
    images = {f"{i}.png": Image.fromarray(rng.integers(0, 255, (72, 24, 3) if i < 5 else (24, 72, 3), dtype=np.uint8)) for i in range(9)}
    images["9.png"] = b"not an image"
    root = write_imagefolder(tmp_path / "data", images)
    data = DataConfig(path=str(root), resolution=32)
    records = load_records(root, data)
    torch.manual_seed(0)
    vae = build_autoencoder("tiny", 32).eval()
    sizes = [(48, 20), (32, 32), (20, 48)]
    folder = build_latent_cache(tmp_path / "cache", {"k": 1}, vae, records, data, batch_size=2, shard_size=3, show_progress=False,
                                buckets=sizes)  # fmt: skip
    cache = load_latent_cache(folder, records)
    assert cache.sizes == [(48, 20), (20, 48)] and cache.bucket_of.tolist() == [0] * 5 + [1] * 4
    assert cache.source_index.tolist() == list(range(9))  # tall first, then wide, each in shard order
    with torch.no_grad():
        for j in range(len(cache)):
            size = cache.sizes[int(cache.bucket_of[j])]
            x = to_tensor(cover_and_crop(open_rgb(records[int(cache.source_index[j])]["image"]), size)[0])[None]
            row = cache.moments[[j]]
            assert row.shape[2:] == (size[0] // 4, size[1] // 4)
            torch.testing.assert_close(row, encode_moments(vae, x).float(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("job", ["train_ldm", "train_autoencoder"])
def test_two_ranks_on_buckets(job, mixed_shapes, tiny_vae, tmp_path):
    """Stage 2: two ranks with batch 4 end with the U-Net of one rank with batch 8, every batch from
    one bucket. Stage 1 draws its posterior noise per rank by design (so there only the data stream
    is shared, tested at the sampler), and two ranks train and log the buckets."""
    import subprocess
    import sys
    from pathlib import Path

    import numpy as np

    from tests.conftest import ROOT, TINY_AE_CONFIG
    from tests.test_train_ldm import TINY_LDM_CONFIG, unet_weights

    accelerate = Path(sys.executable).parent / "accelerate"
    if job == "train_ldm":
        common = ["--config", str(TINY_LDM_CONFIG), f"model.vae={tiny_vae}", f"cache.dir={tmp_path / 'cache'}", "train.sample_every=100"]
    else:
        common = ["--config", str(TINY_AE_CONFIG), "train.sample_every=100", "loss.disc_start=2"]
    common += [f"data.path={mixed_shapes}", "data.buckets.enabled=true", "train.max_steps=4", "train.checkpoint_every=4",
               "train.mixed_precision=fp32"]  # fmt: skip  (bf16 would round a batch of 8 differently from two of 4)
    runs = {"one": ["--num_processes", "1"], "two": ["--multi_gpu", "--num_processes", "2"]}
    for name, procs in runs.items() if job == "train_ldm" else [("two", runs["two"])]:
        batch = 8 if name == "one" else 4
        cmd = [str(accelerate), "launch", *procs, "-m", f"training.{job}", *common, f"output_dir={tmp_path / name}", f"train.batch_size={batch}"]
        run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        assert run.returncode == 0, run.stderr[-3000:]
    log = [json.loads(line) for line in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert log[0]["processes"] == 2 and [[n for n in r["images"] if n] for r in log if r.get("event") == "buckets"] == [[16, 16, 16]]
    if job == "train_ldm":
        a, b = unet_weights(tmp_path / "one"), unet_weights(tmp_path / "two")
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
        loss = [[r["loss"] for r in map(json.loads, (tmp_path / n / "log.jsonl").read_text().splitlines()) if "loss" in r] for n in runs]
        assert len(loss[0]) == 2 and np.allclose(loss[0], loss[1], atol=1e-5)
    else:
        assert (tmp_path / "two" / "vae" / "config.json").is_file() and "g_loss" in [r for r in log if "l1" in r][-1]


def test_buckets_that_bf16_computes_wrongly_on_this_cpu_are_refused_in_training_and_generation(monkeypatch):
    """On a CPU whose bf16 stride-2 convolutions go wrong on maps under 4 pixels wide (probed;
    the AMX Xeon VM is one), a bucket or a generated size that makes such maps is an error naming
    it and the fix; elsewhere it runs. The rule: the last downsampling convolution sees the image
    shrunk by half the total downsampling."""
    from types import SimpleNamespace

    import runtime.hardware
    import training.buckets as buckets
    from runtime import NARROW_MAP, bf16_wrong_sizes
    from runtime.errors import InputError as Refused
    from tests.conftest import tiny_pipeline

    assert NARROW_MAP == 4
    bf16_cpu, fp32_cpu = (SimpleNamespace(mixed_precision=p, device=torch.device("cpu")) for p in ("bf16", "no"))
    monkeypatch.setattr(runtime.hardware, "bf16_narrow_maps_ok", lambda: False)
    assert bf16_wrong_sizes(make_buckets(32, 16, 16, 64, 16), 16) == [(64, 16), (16, 64)]  # 16 * 2 // 16 = 2 wide
    assert bf16_wrong_sizes(make_buckets(64, 16, 32, 128, 16), 16) == []  # the 64-pixel defaults: 32 * 2 // 16 = 4
    buckets.refuse_narrow_buckets([(64, 16), (32, 32)], 16, "the U-Net", 32, fp32_cpu)  # fp32 computes them right
    for ok in (True, False):
        monkeypatch.setattr(runtime.hardware, "bf16_narrow_maps_ok", lambda ok=ok: ok)
        if ok:
            buckets.refuse_narrow_buckets([(64, 16), (32, 32)], 16, "the U-Net", 32, bf16_cpu)
        else:
            with pytest.raises(Refused, match=r"data.buckets: 64x16 leave maps 2 pixels wide .* at least 32: a list such as "
                                              r"data.buckets.sizes=\[\[48,32\],\[32,32\],\[32,48\]\], or .*mixed_precision=fp32"):  # fmt: skip
                buckets.refuse_narrow_buckets([(64, 16), (32, 32)], 16, "the U-Net", 32, bf16_cpu)  # min_side=32 would leave only 32x32
            with pytest.raises(Refused, match=r"at least 32: data.buckets.min_side=32, or a list"):
                buckets.refuse_narrow_buckets([(128, 16), (64, 64)], 16, "the U-Net", 64, bf16_cpu)

    pipe = tiny_pipeline().prepare_for_inference(device="cpu", dtype="bf16")  # total downsampling 8
    run = lambda h, w: pipe(["sun"], height=h, width=w, num_inference_steps=1, output_type="latent").images  # noqa: E731
    monkeypatch.setattr(runtime.hardware, "bf16_narrow_maps_ok", lambda: False)
    with pytest.raises(Refused, match=r"8x32 \(height x width\) leaves maps 2 pixels wide .* sides of at least 16, or fp32"):
        run(8, 32)
    assert run(16, 32).shape[2:] == (4, 8)  # 16 * 2 // 8 = 4: fine
    monkeypatch.setattr(runtime.hardware, "bf16_narrow_maps_ok", lambda: True)
    assert run(8, 32).shape[2:] == (2, 8)

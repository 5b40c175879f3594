"""benchmarks/report.py turns the benchmarks' figures into RESULTS.md: the target table must say
"yes" exactly where a target is met (the benchmarks themselves run in `make bench`, not here)."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _report():
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "benchmarks" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _results(gen_speedup: float, train_ratio: float, lpips_ours: float, of_bf16: float) -> dict:
    return {
        "generation_speed.py": {"ours_default_speedup": gen_speedup, "ours_default_psnr_db": 52.0, "ours_compile_speedup": 2.0},
        "training_throughput.py": {"ratio": train_ratio, "ours": {"images_per_s": 200.0}, "baseline": {"images_per_s": 100.0},
                                   "target_loss": 0.16, "time_ratio": 1.2},
        "autoencoder_recipe.py": {"ours": {"lpips": lpips_ours, "train_seconds": 120}, "baseline": {"lpips": 0.14, "train_seconds": 121}},
        "unet_hardware.py": {"forward": {"bf16": {"of_bf16_matmul": of_bf16, "gflops": 400.0}}, "matmul_gflops": {"bf16": 1000.0}},
    }


def test_targets_are_judged_from_the_figures():
    report = _report()
    met = [ok for *_, ok in report.targets(_results(2.6, 3.1, 0.10, 0.30))]
    assert met == [True, True, True, True]
    missed = [ok for *_, ok in report.targets(_results(1.9, 1.7, 0.15, 0.20))]
    assert missed == [False, False, False, False]


def test_render_writes_machine_sections_and_verdicts(tmp_path):
    report = _report()
    results = _results(1.9, 3.2, 0.10, 0.43)
    record = {"machine": {"CPU": "test CPU", "cores": "2"}, "minutes": 12.0,
              "benchmarks": {name: {"title": f"{i}. {name}", "command": f"python {name}", "minutes": 1.0, "text": f"figures of {name}",
                                    "results": r} for i, (name, r) in enumerate(results.items(), 1)}}  # fmt: skip
    text = report.render(record)
    assert "| CPU | test CPU |" in text and "12.0 minutes" in text
    rows = [line for line in text.splitlines() if line.startswith("| generation") or line.startswith("| train_ldm")]
    assert "**no**" in rows[0] and rows[1].endswith("| yes |")
    assert all(f"figures of {name}" in text for name in results)
    assert text.index("1. generation_speed.py") < text.index("2. training_throughput.py")


def test_large_dataset_rows_are_rendered_with_their_machine(tmp_path):
    import json

    report = _report()
    path = tmp_path / "LARGE_DATASET.json"
    assert report.large_dataset_section(path) == []  # not measured yet: no section
    rows = [{"images": 100000, "processes": 2, "peak_rss_mib": 790.5, "encode_s": 120.0, "encode_images_per_s": 833.3,
             "launch_to_first_step_s": 150.2}]  # fmt: skip
    path.write_text(json.dumps({"machine": {"CPU": "test CPU", "cores": "2", "date": "2026-11-26"}, "rows": rows}))
    text = "\n".join(report.large_dataset_section(path))
    assert "test CPU (2 cores), 2026-11-26" in text and "| 100,000 | 2 | 790.5 | 120.0 | 833.3 | 150.2 |" in text
    parquet = {"machine": {"CPU": "other CPU", "cores": "2", "date": "2026-12-02"}, "source": "parquet", "setup": "Stage 2 on parquet",
               "command": "benchmarks/large_dataset.py --source parquet --images 2000 40000 --save", "rows": rows}  # fmt: skip
    path.write_text(json.dumps(parquet))
    text = "\n".join(report.large_dataset_section(path))
    assert "(parquet; issues 14, 25)" in text and "Stage 2 on parquet: `.venv/bin/python benchmarks/large_dataset.py --source parquet" in text

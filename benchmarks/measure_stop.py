"""How long a stop takes: SIGTERM to `accelerate launch` of a stage-2 run once it has logged step
30, then the seconds until every process is gone (the rest of the step and one checkpoint write).

    python benchmarks/measure_stop.py OUTPUT_DIR [--processes N] --config CONFIG [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("output_dir", type=Path)
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--after-step", type=int, default=30)
    args, job = p.parse_known_args()
    n = args.processes
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *(["--multi_gpu"] if n > 1 else []), "--num_processes", str(n),
           "-m", "training.train_ldm", *job, f"output_dir={args.output_dir}", "train.log_every=1", "train.max_steps=1000000"]  # fmt: skip
    launcher = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = args.output_dir / "log.jsonl"
    while not (log.is_file() and any(r.get("step", 0) >= args.after_step and "loss" in r
                                      for r in map(json.loads, log.read_text().splitlines()))):  # fmt: skip
        if launcher.poll() is not None:
            sys.exit(launcher.stderr.read()[-3000:])
        time.sleep(0.1)
    ranks = psutil.Process(launcher.pid).children(recursive=True)
    start = time.time()
    launcher.send_signal(signal.SIGTERM)
    _, err = launcher.communicate()
    psutil.wait_procs(ranks, timeout=120)
    said = [line for line in err.splitlines() if line.startswith(("stopped", "error"))]
    print(json.dumps({"processes": n, "stop_s": round(time.time() - start, 2), "said": said}))


if __name__ == "__main__":
    main()

"""The README's pictures of the web pages, taken in Debian's Chromium (headless, through playwright):
the generation page on a trained pipeline, and TensorBoard on a run's logs.

    .venv/bin/python docs/screenshots.py app --model runs/ldm-openmoji-32/pipeline --out docs/app.png
    .venv/bin/python docs/screenshots.py tensorboard --logdir runs/ --out docs/tensorboard.png
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]  # fmt: skip


def serve(cmd: list[str], url: str) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(240):
        try:
            urllib.request.urlopen(url, timeout=2)
            return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"{cmd[0]} did not answer on {url}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("page", choices=["app", "tensorboard"])
    p.add_argument("--model", default="runs/ldm-openmoji-32/pipeline")
    p.add_argument("--logdir", default="runs/")
    p.add_argument("--prompt", default="red apple")
    p.add_argument("--tags", default="^(loss|lr|images_per_s)$|samples", help="tensorboard: the tags shown (regex)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    from playwright.sync_api import expect, sync_playwright

    if args.page == "app":
        url = "http://127.0.0.1:7871"
        proc = serve([sys.executable, "-m", "ldm.app", "--model", args.model, "--port", "7871"], url)
    else:
        url = "http://127.0.0.1:6007"
        proc = serve([str(Path(sys.executable).parent / "tensorboard"), "--logdir", args.logdir, "--port", "6007",
                      "--host", "127.0.0.1"], url)  # fmt: skip
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=shutil.which("chromium"), args=ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(url)
            if args.page == "app":
                page.get_by_label("Prompt", exact=True).fill(args.prompt)
                page.get_by_label("Seed", exact=True).fill("3")
                page.locator("#num-images input[type=number]").fill("8")
                page.get_by_role("button", name="Generate").click()
                expect(page.locator("#gallery img")).to_have_count(8, timeout=300_000)
                time.sleep(1)
            else:  # the stage-2 run's curves and sample grids
                page.wait_for_selector("text=loss", timeout=60_000)
                page.locator("input[placeholder='Filter tags (regex)']").first.fill(args.tags)
                page.keyboard.press("Escape")  # the tag suggestions
                page.get_by_text("Settings", exact=True).last.click()  # the settings pane, open at first
                time.sleep(8)  # the charts draw
            page.screenshot(path=str(args.out), full_page=True)
            browser.close()
    finally:
        proc.terminate()
    print(args.out)


if __name__ == "__main__":
    main()

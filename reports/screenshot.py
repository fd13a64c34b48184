"""Render a report's index.html to a PNG with headless Chromium, for review and CI artefacts.

    python3 -m reports.screenshot OUT/index.html OUT/screenshot.png [--height N]

What it is: a thin wrapper that finds chromium / chromium-browser / google-chrome on PATH and
runs its --headless --screenshot. What it is not: a browser installer or a visual test; with
no browser installed it raises ScreenshotError saying so (exit 2 from the command line).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from harness.errors import TandemError

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
WIDTH = 1400


class ScreenshotError(TandemError):
    exit_code = 2


def find_browser() -> str | None:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def estimate_height(html: str) -> int:
    """A window tall enough for the whole page: figures ~700 px, table rows ~30 px."""
    imgs = len(re.findall(r"<img ", html))
    rows = len(re.findall(r"<tr", html))
    notes = len(re.findall(r'class="note', html)) + len(re.findall(r"<h2", html))
    return int(min(16000, max(1200, 400 + 720 * imgs + 31 * rows + 70 * notes)))


def screenshot(index: Path, png: Path, height: int | None = None, timeout_s: float = 120) -> Path:
    """Write `png` (1400 px wide, `height` px tall, estimated from the page if None).
    Raises ScreenshotError when no browser is found or it fails."""
    index, png = Path(index).resolve(), Path(png).resolve()
    if not index.exists():
        raise ScreenshotError(f"no such file: {index}")
    browser = find_browser()
    if browser is None:
        raise ScreenshotError(
            f"no headless Chromium on PATH (looked for {', '.join(BROWSERS)}); HINT: install "
            "one, e.g. `apt-get install chromium`, or open the report in a browser instead")
    height = height or estimate_height(index.read_text(encoding="utf-8"))
    png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tandem-chromium-") as profile:
        cmd = [browser, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
               "--no-first-run", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
               f"--screenshot={png}", f"--window-size={WIDTH},{height}",
               "--virtual-time-budget=5000", index.as_uri()]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise ScreenshotError(f"{browser} did not finish within {timeout_s:g} s") from exc
    if proc.returncode != 0 or not png.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise ScreenshotError(f"{browser} failed (exit {proc.returncode}) on {index}: "
                              + " | ".join(tail))
    return png


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m reports.screenshot", description=__doc__)
    ap.add_argument("index", type=Path)
    ap.add_argument("png", type=Path)
    ap.add_argument("--height", type=int, default=None, help="window height in px")
    a = ap.parse_args(argv)
    try:
        print(screenshot(a.index, a.png, a.height))
    except ScreenshotError as exc:
        print(f"screenshot: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())

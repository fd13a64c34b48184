"""Render a report's index.html to a PNG with headless Chromium, checking the page on the way.

    python3 -m reports.screenshot OUT/index.html OUT/screenshot.png [--height N]

What it is: the command-line face of reports.browser_check (also behind `tandem report
--screenshot`): it finds chromium / chromium-browser / google-chrome on PATH, loads the page,
writes a full-page screenshot and fails when the page shows a console error, a figure that did
not load or a blank picture. What it is not: a browser installer; with no browser installed it
raises ScreenshotError saying so (exit 2 from the command line).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from reports.browser_check import (BROWSERS, BrowserCheckError, ScreenshotError, check_report,
                                   find_browser)

__all__ = ["BROWSERS", "BrowserCheckError", "ScreenshotError", "find_browser", "screenshot"]


def screenshot(index: Path, png: Path, height: int | None = None, timeout_s: float = 120) -> Path:
    """Write `png` (1400 px wide; the whole page tall, or `height` px) and check the page
    (reports.browser_check.check_report). Returns `png`. Raises BrowserCheckError listing the
    page's problems (the screenshot is written all the same), ScreenshotError when no browser
    is found or it fails."""
    return check_report(index, png, height=height, timeout_s=timeout_s).png


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m reports.screenshot", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("index", type=Path)
    ap.add_argument("png", type=Path)
    ap.add_argument("--height", type=int, default=None,
                    help="window height in px (default: the whole page)")
    a = ap.parse_args(argv)
    try:
        result = check_report(a.index, a.png, a.height, raise_on_problems=False)
    except ScreenshotError as exc:
        print(f"screenshot: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(result.summary(), file=sys.stderr if result.problems else sys.stdout)
    return BrowserCheckError.exit_code if result.problems else 0


if __name__ == "__main__":
    sys.exit(main())

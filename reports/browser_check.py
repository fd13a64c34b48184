"""Open a report's index.html in headless Chromium and check what a reader would see.

What it is: a small client of Chromium's DevTools protocol over --remote-debugging-pipe (stdlib
only) that loads the page once, collects console errors, uncaught exceptions and failed loads,
asks the page whether each <img> loaded and decoded, takes a full-page screenshot and checks
with Pillow that it, and the box of every figure in it, is not blank. What it is not: a visual
diff against a reference picture, or a browser installer (no browser: ScreenshotError).
"""

from __future__ import annotations

import base64
import fcntl
import io
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness.errors import TandemError

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
WIDTH = 1400  # px, the window width; the report's column is 1320 px
MAX_HEIGHT = 16000  # px, the tallest full-page screenshot taken
# A region is blank when nearly all its pixels are one shade: fewer than MIN_INK of them differ
# from its most common grey level, or the grey levels barely vary (MIN_STDDEV, of 0-255). The
# report's figures measure 8-36% ink and a standard deviation of 30-60; a one-colour box has 0.
MIN_INK = 0.01
MIN_STDDEV = 2.0

# What the page is asked once it has loaded: every image with its state and its box in page
# coordinates, inside its CSS border (the screenshot is of the whole page, so these boxes index
# into it; the border alone would make a blank figure look drawn).
_PAGE_STATE_JS = """JSON.stringify({
  images: Array.from(document.images, (i) => {
    const r = i.getBoundingClientRect();
    return {src: i.getAttribute("src"), alt: i.alt, complete: i.complete,
            natural: [i.naturalWidth, i.naturalHeight],
            box: [r.left + scrollX + i.clientLeft, r.top + scrollY + i.clientTop,
                  i.clientWidth, i.clientHeight]};
  }),
  height: Math.ceil(document.documentElement.scrollHeight)})"""


class ScreenshotError(TandemError):
    """No browser, or the browser failed or hung: the page could not be checked at all."""

    exit_code = 2


class BrowserCheckError(TandemError):
    """The page was loaded and something is wrong with it; the message lists every problem."""

    exit_code = 1

    def __init__(self, message: str, result: "BrowserCheck"):
        super().__init__(message)
        self.result = result


@dataclass
class Figure:
    src: str
    alt: str
    loaded: bool  # complete and decoded (naturalWidth > 0)
    natural: tuple[int, int]  # the image's own size, px
    box: tuple[float, float, float, float]  # left, top, width, height on the page (inside the
    # border), px
    ink: float = 0.0  # share of the figure's screenshot box not at its most common grey level


@dataclass
class BrowserCheck:
    """What one load of the page showed. `problems` is empty when the page passed."""

    index: Path
    png: Path
    browser: str
    figures: list[Figure] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)  # errors, exceptions, failed loads
    console_other: list[str] = field(default_factory=list)  # warnings and logs (not failures)
    page_ink: float = 0.0
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        ok = sum(f.loaded for f in self.figures)
        head = (f"{self.index}: {ok}/{len(self.figures)} figure(s) loaded, "
                f"{len(self.console_errors)} console error(s), screenshot {self.png} "
                f"({100 * self.page_ink:.1f}% ink)")
        return head + "".join(f"\n  - {p}" for p in self.problems)


def find_browser() -> str | None:
    """The first of BROWSERS on PATH, or None."""
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def _ink(img) -> tuple[float, float]:
    """(share of pixels not at the most common grey level, grey-level standard deviation)."""
    hist = img.convert("L").histogram()
    n = sum(hist)
    if n == 0:
        return 0.0, 0.0
    mean = sum(i * c for i, c in enumerate(hist)) / n
    var = sum(c * (i - mean) ** 2 for i, c in enumerate(hist)) / n
    return 1.0 - max(hist) / n, var ** 0.5


class _Pipe:
    """DevTools protocol over two pipes: JSON messages separated by NUL bytes."""

    def __init__(self, to_browser: int, from_browser: int, deadline: float):
        self.wfd, self.rfd, self.deadline = to_browser, from_browser, deadline
        self.buf = b""
        self.next_id = 0
        self.events: list[dict] = []

    def _read_message(self, waiting_for: str) -> dict:
        while b"\0" not in self.buf:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(waiting_for)
            ready, _, _ = select.select([self.rfd], [], [], left)
            if not ready:
                continue
            chunk = os.read(self.rfd, 1 << 20)
            if not chunk:
                raise EOFError(waiting_for)
            self.buf += chunk
        msg, self.buf = self.buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.wfd, json.dumps(msg).encode() + b"\0")
        while True:
            reply = self._read_message(method)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise ScreenshotError(f"DevTools {method} failed: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def wait_event(self, method: str) -> dict:
        for ev in self.events:
            if ev["method"] == method:
                return ev
        while True:
            ev = self._read_message(method)
            if "method" in ev:
                self.events.append(ev)
                if ev["method"] == method:
                    return ev


def _console_text(ev: dict) -> tuple[str, bool]:
    """(one line naming the message and where it came from, whether it is an error)."""
    m, p = ev["method"], ev["params"]
    if m == "Runtime.consoleAPICalled":
        args = " ".join(str(a.get("value", a.get("description", ""))) for a in p["args"])
        frame = (p.get("stackTrace") or {}).get("callFrames") or [{}]
        where = f" ({frame[0].get('url', '')}:{frame[0].get('lineNumber', 0) + 1})" \
            if frame[0].get("url") else ""
        return f"console.{p['type']}: {args}{where}", p["type"] in ("error", "assert")
    if m == "Runtime.exceptionThrown":
        d = p["exceptionDetails"]
        text = (d.get("exception") or {}).get("description") or d.get("text", "")
        return (f"uncaught exception: {text.splitlines()[0] if text else '?'} "
                f"({d.get('url', '')}:{d.get('lineNumber', 0) + 1})"), True
    if m == "Log.entryAdded":
        e = p["entry"]
        url = f" ({e['url']})" if e.get("url") else ""
        return f"{e['level']} [{e['source']}]: {e['text']}{url}", e["level"] == "error"
    if m == "Network.loadingFailed":
        return f"failed to load {p.get('url', p['requestId'])}: {p['errorText']}", True
    return m, False


def _launch(browser: str, profile: str, log) -> tuple[subprocess.Popen, int, int]:
    """Start the browser with the DevTools pipe on its fds 3 (commands in) and 4 (replies out)."""
    cmd_r, cmd_w = os.pipe()
    rep_r, rep_w = os.pipe()
    # the child's ends move above 9 first, so that putting them on 3 and 4 clobbers neither
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (cmd_r, rep_w)]
    os.close(cmd_r)
    os.close(rep_w)
    cmd_r, rep_w = high
    # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start; the page is a
    # local report, not the web
    argv = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            "--no-first-run", "--no-default-browser-check", "--disable-dev-shm-usage",
            "--disable-extensions", "--mute-audio", f"--user-data-dir={profile}",
            f"--window-size={WIDTH},900", "--remote-debugging-pipe", "about:blank"]
    # bash (dash takes single-digit fds only) puts the two ends on the fds the protocol fixes
    shell = f'exec "$@" 3<&{cmd_r} 4>&{rep_w} {cmd_r}<&- {rep_w}>&-'
    proc = subprocess.Popen(["bash", "-c", shell, "bash", *argv], pass_fds=(cmd_r, rep_w),
                            stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                            start_new_session=True)
    os.close(cmd_r)
    os.close(rep_w)
    return proc, cmd_w, rep_r


def _load(browser: str, index: Path, height: int | None, timeout_s: float
          ) -> tuple[list[dict], dict, bytes]:
    """One load of `index`: (the protocol events seen, the page state from _PAGE_STATE_JS,
    the screenshot's PNG bytes). Raises ScreenshotError when the browser fails or hangs."""
    with tempfile.TemporaryDirectory(prefix="tandem-chromium-") as tmp:
        log_path = Path(tmp) / "browser.log"
        with open(log_path, "wb") as log:
            proc, wfd, rfd = _launch(browser, str(Path(tmp) / "profile"), log)
        cdp = _Pipe(wfd, rfd, time.monotonic() + timeout_s)
        try:
            target = cdp.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            s = cdp.send("Target.attachToTarget", {"targetId": target, "flatten": True})
            s = s["sessionId"]
            for domain in ("Page", "Runtime", "Log", "Network"):
                cdp.send(f"{domain}.enable", session=s)
            metrics = {"width": WIDTH, "height": height or 900, "deviceScaleFactor": 1,
                       "mobile": False}
            cdp.send("Emulation.setDeviceMetricsOverride", metrics, session=s)
            cdp.events.clear()
            nav = cdp.send("Page.navigate", {"url": index.as_uri()}, session=s)
            if nav.get("errorText"):
                raise ScreenshotError(f"{browser} could not open {index}: {nav['errorText']}")
            cdp.wait_event("Page.loadEventFired")  # after every image loaded or failed
            state = json.loads(cdp.send("Runtime.evaluate", {
                "expression": _PAGE_STATE_JS, "returnByValue": True}, session=s)
                ["result"]["value"])
            # the window grows to the whole page, so one capture holds every figure
            metrics["height"] = height or min(MAX_HEIGHT, max(900, state["height"]))
            cdp.send("Emulation.setDeviceMetricsOverride", metrics, session=s)
            data = cdp.send("Page.captureScreenshot", {"format": "png"}, session=s)["data"]
            # one more round trip: messages the page sent while it settled are in before it
            cdp.send("Runtime.evaluate", {"expression": "0"}, session=s)
            try:
                cdp.send("Browser.close")
            except (EOFError, TimeoutError, ScreenshotError):
                pass  # closing is best effort; the process is reaped below either way
        except (EOFError, TimeoutError) as exc:
            what = ("exited" if isinstance(exc, EOFError)
                    else f"did not answer within {timeout_s:g} s")
            tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
            raise ScreenshotError(f"{browser} {what} while waiting for {exc.args[0]} on "
                                  f"{index}: " + " | ".join(tail)) from None
        finally:
            os.close(wfd)
            os.close(rfd)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
    return cdp.events, state, base64.b64decode(data)


def _messages(events: list[dict]) -> tuple[list[str], list[str]]:
    """(errors, other messages) from the console, uncaught exceptions and failed loads."""
    requests = {e["params"]["requestId"]: e["params"]["request"]["url"]
                for e in events if e["method"] == "Network.requestWillBeSent"}
    failed = set()
    for ev in events:
        if ev["method"] == "Network.loadingFailed":
            ev["params"]["url"] = requests.get(ev["params"]["requestId"])
            failed.add(ev["params"]["url"])
    errors, other = [], []
    for ev in events:
        if ev["method"] == "Log.entryAdded" and ev["params"]["entry"].get("url") in failed:
            continue  # the same failed load, already said by Network.loadingFailed
        if ev["method"] in ("Runtime.consoleAPICalled", "Runtime.exceptionThrown",
                            "Log.entryAdded", "Network.loadingFailed"):
            text, is_error = _console_text(ev)
            (errors if is_error else other).append(text)
    return errors, other


def check_report(index: Path, png: Path, height: int | None = None, timeout_s: float = 120,
                 browser: str | None = None, raise_on_problems: bool = True) -> BrowserCheck:
    """Load `index` in headless Chromium, write a screenshot to `png` and check the page.

    The page fails when: the console shows an error, an uncaught exception or a failed load;
    an <img> did not load or decode; the page holds fewer images than index.html's <img> tags;
    a figure's box in the screenshot, or the screenshot itself, is blank (< MIN_INK ink).
    `png` is WIDTH px wide and the whole page tall (at most MAX_HEIGHT px: figures below that
    are checked as loaded, not as drawn), or `height` px. `png` is written even when the check
    fails. Raises BrowserCheckError (exit 1) listing every problem unless `raise_on_problems`
    is False; ScreenshotError (exit 2) when no browser is found or it fails or hangs.
    """
    from PIL import Image

    index, png = Path(index).resolve(), Path(png).resolve()
    if not index.exists():
        raise ScreenshotError(f"no such file: {index}")
    browser = browser or find_browser()
    if browser is None:
        raise ScreenshotError(
            f"no headless Chromium on PATH (looked for {', '.join(BROWSERS)}); HINT: install "
            "one, e.g. `apt-get install chromium`, or open the report in a browser instead")
    events, state, data = _load(browser, index, height, timeout_s)
    png.parent.mkdir(parents=True, exist_ok=True)
    png.write_bytes(data)
    shot = Image.open(io.BytesIO(data))
    shot.load()

    result = BrowserCheck(index, png, browser)
    result.console_errors, result.console_other = _messages(events)
    problems = result.problems
    problems += [f"console: {t}" for t in result.console_errors]
    tags = index.read_text(encoding="utf-8").count("<img ")
    if len(state["images"]) < tags:
        problems.append(f"the page holds {len(state['images'])} image(s) but index.html has "
                        f"{tags} <img> tag(s)")
    for im in state["images"]:
        f = Figure(im["src"], im["alt"], bool(im["complete"] and im["natural"][0] > 0),
                   tuple(im["natural"]), tuple(im["box"]))
        result.figures.append(f)
        name = f"figure {f.alt!r} ({f.src})"
        if not f.loaded:
            problems.append(f"{name} did not load: the browser could not read or decode it")
            continue
        x, y, w, h = f.box
        if w < 1 or h < 1:
            problems.append(f"{name} loaded but takes no space on the page ({w:g}x{h:g} px)")
            continue
        if y >= shot.height:
            continue  # below a screenshot cut short: loaded, not pictured
        f.ink, sd = _ink(shot.crop((int(x), int(y), min(shot.width, int(x + w)),
                                    min(shot.height, int(y + h)))))
        if f.ink < MIN_INK or sd < MIN_STDDEV:
            problems.append(f"{name} is blank in the screenshot ({100 * f.ink:.2f}% of its "
                            f"pixels differ from its background, grey-level stddev {sd:.1f})")
    result.page_ink, page_sd = _ink(shot)
    if result.page_ink < MIN_INK or page_sd < MIN_STDDEV:
        problems.append(f"the screenshot is blank ({100 * result.page_ink:.2f}% of its pixels "
                        f"differ from the background, grey-level stddev {page_sd:.1f})")
    if problems and raise_on_problems:
        raise BrowserCheckError(
            f"{index} failed its browser check ({len(problems)} problem(s)):\n  - "
            + "\n  - ".join(problems), result)
    return result

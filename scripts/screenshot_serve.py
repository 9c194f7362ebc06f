"""Screenshots of `llm serve`'s chat page for docs/img: the server started as a user starts it,
the page driven in headless Chromium (Playwright) through a short conversation
(``serve_chat.png``), then its inspect view of the last exchange (``serve_inspect.png``).

    pip install -e ".[serve,docs]"           # FastAPI, uvicorn, Playwright; browser: chromium
    python scripts/screenshot_serve.py --ckpt logs/train/runs/<date>/checkpoints/last.ckpt

``chat`` and ``inspect`` are what tests/test_serve.py's browser test drives too: type a
message, press Enter, wait for the streamed reply to finish; click Inspect, wait for the view.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("screenshots", ROOT / "scripts" / "screenshots.py")
assert _spec and _spec.loader
shots: Any = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(shots)  # its browser finder, launcher and PNG writer

# what each reply is asked; the checkpoint decides what comes back
TURNS = ("ROMEO:", "JULIET:")
# counts the reply's changes as it streams (each piece appended is one)
COUNT_PIECES = """() => {
  window.__pieces = 0;
  new MutationObserver((ms) => { window.__pieces += ms.length; })
    .observe(document.getElementById("messages"), {childList: true, subtree: true,
                                                   characterData: true});
}"""


@contextmanager
def serve(ckpt: Path, *settings: str) -> Iterator[str]:
    """``llm serve ckpt_path=<ckpt> port=0``: its URL once /health answers; SIGTERM after."""
    cmd = [sys.executable, "-m", "llm", "serve", f"ckpt_path={ckpt}", "port=0", *settings]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if " at http://" not in line:
            raise RuntimeError(f"llm serve did not start: {line!r}")
        url = line.split(" at ", 1)[1].split()[0]
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5):
                    break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("llm serve never answered /health") from None
                time.sleep(0.05)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def chat(page: Any, text: str) -> str:
    """Send ``text`` from the page's composer; the reply once it has streamed in whole."""
    replies = page.locator("#messages li.assistant")
    before = replies.count()
    page.fill("#input", text)
    page.press("#input", "Enter")
    page.wait_for_function(
        "n => document.querySelectorAll('#messages li.assistant').length > n"
        " && !document.querySelector('#messages li.streaming')",
        arg=before,
    )
    return str(replies.nth(before).text_content())


# what the inspect view drew: table rows and cells, the canvas's size, the selectors' choices,
# and whether any of the canvas's pixels were painted
VIEW = """() => {
  const lens = [...document.querySelectorAll('#lens-table tbody tr')];
  const c = document.getElementById('att-canvas');
  const px = c.width ? c.getContext('2d').getImageData(0, 0, c.width, c.height).data : [];
  return {
    next_rows: document.querySelectorAll('#next-table tbody tr').length,
    lens_rows: lens.length,
    lens_cells: lens.map((r) => r.cells.length),
    canvas: [c.width, c.height],
    heads: [document.getElementById('att-layer').options.length,
            document.getElementById('att-head').options.length],
    painted: px.some((v, i) => i % 4 !== 3 && v !== 255),
  };
}"""


def inspect(page: Any) -> dict[str, Any]:
    """Click Inspect; once the view is drawn, what it shows (VIEW)."""
    page.click("#inspect-button")
    page.wait_for_function(
        "() => !document.getElementById('inspect-body').hidden"
        " && !document.getElementById('inspect-button').disabled"
    )
    return dict(page.evaluate(VIEW))


def shoot(url: str, out: Path, executable: str | None, width: int, height: int) -> Path:
    """A conversation of TURNS on the page at ``url``, saved as ``out/serve_chat.png``; then
    the inspect view of the last exchange (attention of the last layer) as
    ``out/serve_inspect.png``."""
    with shots.browser(executable) as chromium:
        page = chromium.new_page(viewport={"width": width, "height": height})
        page.set_default_timeout(60_000)
        page.goto(url)
        page.fill("#max_tokens", "100")
        page.fill("#seed", "1337")
        for turn in TURNS:
            chat(page, turn)
        path = out / "serve_chat.png"
        shots.save_png(page, path)
        inspect(page)
        page.set_viewport_size({"width": width, "height": 2 * height})
        page.select_option("#att-layer", str(page.locator("#att-layer option").count() - 1))
        page.evaluate("document.getElementById('inspect').scrollIntoView()")
        shots.save_png(page, out / "serve_inspect.png")
        page.close()
    return path


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, required=True, help="a language-model checkpoint")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    parser.add_argument("--chromium", help="browser executable (default: chromium on PATH)")
    parser.add_argument("--width", type=int, default=1100)
    parser.add_argument("--height", type=int, default=640)
    args = parser.parse_args(argv)
    if not args.ckpt.is_file():
        parser.error(f"--ckpt {args.ckpt}: no such file")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with serve(args.ckpt) as url:
        shoot(url, args.out, shots.find_browser(args.chromium), args.width, args.height)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

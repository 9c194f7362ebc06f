"""Screenshots of TensorBoard for the README (docs/img/): a fresh run and a 4-job sweep.

    pip install -e ".[docs]"                 # Playwright; the browser: Debian's chromium
    python scripts/screenshots.py            # trains both (a few minutes on a CPU), then shoots
    python scripts/screenshots.py --run <run folder> --sweep <sweep folder>   # no training

It trains a tiny char model on tiny shakespeare (``--data``, else the corpus ``llm train``
downloads to data/tinyshakespeare/input.txt) through an experiment file it writes, so the
runs' names and HPARAMS' first columns are the swept keys and not the tiny settings. It starts
TensorBoard on each, waits until the server has read every run to its end, and drives headless
Chromium (Playwright) through CUSTOM SCALARS (the loss chart first), IMAGES (the attention heat
maps in their cards, as the tab opens), TEXT (the samples) and HPARAMS (the sweep's table): each
shot waits on the page's own elements, never on a fixed delay.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "tiny_shakespeare"
# the sweep's grid: two norms x two learning rates
SWEEP = {"model.norm": ["layernorm", "rmsnorm"], "optim.lr": ["1e-3", "3e-3"]}
END_TAG = "whole_run/best_val_loss"  # written last: a run that has it was read to its end
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# file name -> what it shows
SHOTS = {
    "tensorboard_run_scalars.png": "a run's CUSTOM SCALARS: the loss chart first",
    "tensorboard_run_attention.png": "a run's IMAGES: one attention heat map per head",
    "tensorboard_run_text.png": "a run's TEXT: the sample at each validation",
    "tensorboard_sweep_hparams.png": "a sweep's HPARAMS table: the swept keys first",
    "tensorboard_sweep_scalars.png": "a sweep's CUSTOM SCALARS: every job's loss",
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--data", type=Path, help="corpus (default: llm train's tiny shakespeare)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img", help="PNG folder")
    parser.add_argument("--work", type=Path, help="where the runs go (default: a temp folder)")
    parser.add_argument("--run", type=Path, help="a run folder to show instead of training one")
    parser.add_argument("--sweep", type=Path, help="a sweep folder to show instead of training")
    parser.add_argument("--only", choices=("run", "sweep"), help="shoot one of the two only")
    parser.add_argument("--steps", type=int, default=300, help="the run's training steps")
    parser.add_argument("--sweep-steps", type=int, default=150, help="each sweep job's steps")
    parser.add_argument("--chromium", help="browser executable (default: chromium on PATH)")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=900)
    args = parser.parse_args(argv)
    for name in ("steps", "sweep_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("run", "sweep", "data"):
        path = getattr(args, name)
        if path is not None and not path.exists():
            parser.error(f"--{name} {path}: no such file or folder")
    return args


def experiment_yaml(steps: int) -> str:
    """The tiny recipe as a Hydra experiment: validation every 50 steps (and at the last)."""
    return f"""# @package _global_
# written by scripts/screenshots.py: a tiny char model, seconds per 100 steps on a CPU
defaults:
  - override /model: tiny
  - override /tokenizer: char
  - override /data: tinyshakespeare
  - override /trainer: cpu
optim:
  warmup_steps: {max(1, steps // 10)}
trainer:
  max_steps: {steps}
  val_check_interval: {min(50, steps)}
  limit_val_batches: 5
  log_every_n_steps: 5
  enable_progress_bar: false
"""


def write_experiment(conf: Path, steps: int) -> Path:
    """``conf/experiment/<EXPERIMENT>.yaml``; ``conf`` goes on Hydra's search path."""
    path = conf / "experiment" / f"{EXPERIMENT}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(experiment_yaml(steps), encoding="utf-8")
    return path


def train_command(
    conf: Path, log_dir: Path, data: Path | None, sweep: dict[str, list[str]] | None = None
) -> list[str]:
    """``llm train`` (``-m`` over ``sweep``'s grid when given) on the experiment in ``conf``."""
    cmd = [sys.executable, "-m", "llm", "train"]
    if sweep:
        cmd.append("-m")
    cmd += [f"experiment={EXPERIMENT}"]
    cmd += [f"{key}={','.join(values)}" for key, values in (sweep or {}).items()]
    cmd += [f"hydra.searchpath=[file://{conf.resolve()}]", f"paths.log_dir={log_dir.resolve()}"]
    if data is not None:
        cmd.append(f"data.path={data.resolve()}")
    return cmd


def only_child(folder: Path) -> Path:
    """The one folder a fresh ``llm train`` made in ``folder``."""
    children = [p for p in folder.iterdir() if p.is_dir()] if folder.is_dir() else []
    if len(children) != 1:
        raise RuntimeError(f"{folder}: expected one run folder, found {len(children)}")
    return children[0]


def train(cmd: list[str], log: Path) -> None:
    print("llm", *cmd[3:], flush=True)  # as a user types it
    with log.open("w", encoding="utf-8") as out:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise RuntimeError(f"llm train failed ({proc.returncode}), see {log}:\n{tail}")


def stage_run(run: Path, logdir: Path) -> Path:
    """A logdir holding only ``run``'s event files, under the run's own name: TensorBoard on
    the run folder itself would call the run '.', and on its parent would list its siblings."""
    events = sorted(run.glob("events.out.tfevents.*"))
    if not events:
        raise RuntimeError(f"--run {run}: no TensorBoard event files in it")
    staged = logdir / run.resolve().name
    staged.mkdir(parents=True, exist_ok=True)
    for path in events:
        shutil.copy2(path, staged / path.name)
    return logdir


def swept_keys(sweep: Path) -> list[str]:
    """The keys whose values differ between the sweep's jobs (their .hydra/overrides.yaml), in
    the first job's order; a key that some jobs lack differs too."""
    from omegaconf import OmegaConf

    jobs = []
    for path in sorted(sweep.glob("*/.hydra/overrides.yaml")):
        pairs = (str(o).partition("=") for o in OmegaConf.load(path))
        jobs.append({key.lstrip("+~"): value for key, _, value in pairs})
    keys = list(dict.fromkeys(k for job in jobs for k in job))
    return [k for k in keys if len({job.get(k) for job in jobs}) > 1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tensorboard_command(logdir: Path, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "tensorboard.main",
        f"--logdir={logdir.resolve()}",
        "--host=127.0.0.1",
        f"--port={port}",
    ]


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def wait_for_runs(
    url: str, runs: int, alive: Callable[[], bool] = lambda: True, timeout: float = 180.0
) -> list[str]:
    """Block until TensorBoard at ``url`` lists ``runs`` runs, each with its end-of-run scalar
    (written last, so the server has read the run through); the run names, sorted.

    ``alive`` says whether the server process still runs: a dead one fails at once."""
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"TensorBoard at {url} exited before it served the runs")
        try:
            names = _get_json(f"{url}/data/runs")
            tags = _get_json(f"{url}/data/plugin/scalars/tags")
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
            time.sleep(0.2)  # the server is starting: poll again
            continue
        done = sorted(n for n in names if END_TAG in tags.get(n, {}))
        seen = done
        if len(done) >= runs:
            return done
        time.sleep(0.2)  # it is still reading event files: poll again
    raise TimeoutError(
        f"TensorBoard at {url}: {runs} finished runs not served in {timeout:.0f}s "
        f"(finished: {seen}; a run without {END_TAG} did not end)"
    )


@contextmanager
def tensorboard(logdir: Path, runs: int, log: Path) -> Iterator[str]:
    """A TensorBoard on a free port serving ``logdir`` once it has read ``runs`` runs: its URL."""
    port = free_port()
    with log.open("w", encoding="utf-8") as out:
        proc = subprocess.Popen(
            tensorboard_command(logdir, port), stdout=out, stderr=subprocess.STDOUT
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_for_runs(url, runs, alive=lambda: proc.poll() is None)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def find_browser(given: str | None) -> str | None:
    """The browser to drive: ``given``, else one on PATH, else None: Playwright's own, where
    ``playwright install chromium`` downloaded it."""
    if given:
        return given
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    return None


def save_png(page: Any, path: Path, max_bytes: int = 300_000) -> None:
    """A viewport screenshot, palette-quantized when the plain PNG is over ``max_bytes``."""
    import io

    from PIL import Image

    data = page.screenshot(type="png")
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.open(io.BytesIO(data))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    if buffer.tell() > max_bytes:
        buffer = io.BytesIO()
        image.convert("RGB").quantize(colors=256).save(buffer, format="PNG", optimize=True)
    tmp = path.with_suffix(".png.tmp")
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(path)
    print(f"{path} ({buffer.tell() // 1000} KB)", flush=True)


def shoot_scalars(page: Any, url: str, lines: int, hover: bool = True) -> None:
    """CUSTOM SCALARS, the run's layout: wait until the loss chart (the first) has its
    ``lines``, widen it, and hover near its right end so the tooltip names each line (a run's
    train/loss and val/loss share its colour)."""
    page.goto(f"{url}/#custom_scalars")
    card = page.locator("tf-custom-scalar-multi-line-chart-card").first
    card.locator("path.line").nth(lines - 1).wait_for(state="attached")
    chart = card.locator("vz-line-chart2")
    narrow = chart.bounding_box()["width"]
    card.locator('paper-icon-button[icon="fullscreen"]').click()
    page.wait_for_function("([el, w]) => el.getBoundingClientRect().width > 1.5 * w",
                           arg=[chart.element_handle(), narrow])  # fmt: skip
    if hover:
        box = chart.bounding_box()
        page.mouse.move(box["x"] + box["width"] * 0.8, box["y"] + box["height"] * 0.4)
        page.locator("vz-chart-tooltip").first.wait_for(state="attached")


def shoot_images(page: Any, url: str) -> None:
    """IMAGES as it opens, "Show actual image size" unticked: a heat map of the default 20
    tokens is narrower than its card, so its token labels read there."""
    page.goto(f"{url}/#images")
    page.locator("tf-image-loader img").first.wait_for()
    for handle in page.locator("tf-image-loader img").element_handles():
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=handle)


def shoot_text(page: Any, url: str) -> None:
    page.goto(f"{url}/#text")
    page.locator("tf-text-loader tf-markdown-view").first.wait_for()
    page.get_by_text("prompt").first.wait_for()


def shoot_hparams(page: Any, url: str, runs: list[str], swept: list[str]) -> None:
    """HPARAMS' table, a row per job. TensorBoard ticks the first five keys it lists (the
    command line's first): untick those every job shares, so the metrics fit beside the swept
    keys."""
    from playwright.sync_api import expect

    page.goto(f"{url}/#hparams")
    for run in runs:
        page.locator("vaadin-grid-cell-content", has_text=run).first.wait_for()
    boxes = page.locator("paper-checkbox.hparam-checkbox")
    for i in range(boxes.count()):
        box = boxes.nth(i)
        name = box.inner_text().strip()
        if box.get_attribute("aria-checked") == "true" and name not in swept:
            box.click()
            expect(page.locator(".table-header", has_text=name)).to_have_count(0)
    page.locator(".table-header", has_text="best val loss").first.wait_for()


@contextmanager
def browser(executable: str | None) -> Iterator[Any]:
    """Headless Chromium through Playwright (``executable``: a system browser's path)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=executable)
        try:
            yield chromium
        finally:
            chromium.close()


def snap(chromium: Any, args: argparse.Namespace, name: str, action: Callable[[Any], None]) -> None:
    """A fresh page brought by ``action`` to what it should show, saved as ``args.out/name``."""
    page = chromium.new_page(viewport={"width": args.width, "height": args.height})
    page.set_default_timeout(60_000)
    try:
        action(page)
        save_png(page, args.out / name)
        print(f"  {SHOTS[name]}", flush=True)
    finally:
        page.close()


def prepare(args: argparse.Namespace, work: Path) -> tuple[Path | None, Path | None]:
    """The run folder and the sweep folder to show: the given ones, else trained in ``work``."""
    run, sweep = args.run, args.sweep
    if run is None and args.only != "sweep":
        conf = work / "conf_run"
        write_experiment(conf, args.steps)
        train(train_command(conf, work / "logs", args.data), work / "run.log")
        run = only_child(work / "logs" / "train" / "runs")
    if sweep is None and args.only != "run":
        conf = work / "conf_sweep"
        write_experiment(conf, args.sweep_steps)
        train(train_command(conf, work / "logs", args.data, SWEEP), work / "sweep.log")
        sweep = only_child(work / "logs" / "train" / "multiruns")
    return (None if args.only == "sweep" else run), (None if args.only == "run" else sweep)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="llm-screenshots-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        shoot_all(args, work)
    except ImportError as e:
        print(f'screenshots: {e} (pip install -e ".[docs]")', file=sys.stderr)
        return 1
    except (RuntimeError, TimeoutError, OSError) as e:
        print(f"screenshots: {e}", file=sys.stderr)
        return 1
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def shoot_all(args: argparse.Namespace, work: Path) -> None:
    """Train what was not given, then shoot the run's tabs and the sweep's."""
    run, sweep = prepare(args, work)
    with browser(find_browser(args.chromium)) as chromium:
        if run is not None:
            logdir = stage_run(run, work / "board_run")
            with tensorboard(logdir, 1, work / "tensorboard_run.log") as url:
                for name, action in (
                    ("tensorboard_run_scalars.png", partial(shoot_scalars, url=url, lines=2)),
                    ("tensorboard_run_attention.png", partial(shoot_images, url=url)),
                    ("tensorboard_run_text.png", partial(shoot_text, url=url)),
                ):
                    snap(chromium, args, name, action)
        if sweep is not None:
            n_jobs = len(list(sweep.glob("*/.hydra/overrides.yaml")))
            swept = swept_keys(sweep)
            with tensorboard(sweep, n_jobs, work / "tensorboard_sweep.log") as url:
                runs = _get_json(f"{url}/data/runs")
                lines = 2 * len(runs)
                for name, action in (
                    ("tensorboard_sweep_hparams.png",
                     partial(shoot_hparams, url=url, runs=runs, swept=swept)),
                    ("tensorboard_sweep_scalars.png",
                     partial(shoot_scalars, url=url, lines=lines, hover=False)),
                ):  # fmt: skip
                    snap(chromium, args, name, action)


if __name__ == "__main__":
    sys.exit(main())

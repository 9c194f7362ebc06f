"""A built wheel runs the verbs on its own: its configs travel inside the package (llm/conf/).

The wheel is built from the checkout's sources and installed into a fresh venv that borrows the
heavy dependencies (torch, Lightning, Hydra, ...) of the running interpreter but not its editable
install of ``llm``; the ``llm`` command then runs from a folder that is not the checkout.
"""

from __future__ import annotations

import os
import re
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from helpers import ROOT, tiny_overrides, write_corpus

PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check"]


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _build_wheel(tmp: Path, env: dict[str, str]) -> Path:
    """The wheel of a copy of the sources (an in-tree build would leave build/ in the checkout,
    whose stale files a later build could ship)."""
    src = tmp / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("llm", "hydra_plugins"):
        shutil.copytree(ROOT / name, src / name, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    # offline: setuptools comes from this interpreter, not from an isolated build env
    build = ["wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(src)]
    built = _run([*PIP, *build], tmp, env)
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (tmp / "dist").glob("*.whl")
    return wheel


def _fresh_venv(tmp: Path) -> tuple[Path, Path]:
    """A venv without pip and without ``llm``; this interpreter's site-packages are on its path
    as plain .pth lines, which run none of the .pth files inside them (the editable finder)."""
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    query = "import sysconfig; print(sysconfig.get_path('purelib'))"
    purelib = subprocess.run([python, "-c", query], capture_output=True, text=True, check=True)
    borrowed = [p for p in site.getsitepackages() if Path(p).is_dir()]
    site_dir = Path(purelib.stdout.strip())
    (site_dir / "borrowed.pth").write_text("\n".join(borrowed) + "\n", encoding="utf-8")
    return python, site_dir


# where `import llm` and the Optuna sweeper Hydra discovers come from
_WHERE = """
import sys, llm
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
(found,) = [c for c in Plugins.instance().discover(Sweeper) if c.__name__ == "LLMOptunaSweeper"]
print(llm.__file__, sys.modules[found.__module__].__file__)
"""


@pytest.mark.slow
def test_an_installed_wheel_trains_from_any_folder(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PROJECT_ROOT"}}
    env |= {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.setdefault("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken"))

    wheel = _build_wheel(tmp_path, env)
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    shipped = {p.relative_to(ROOT).as_posix() for p in (ROOT / "llm" / "conf").rglob("*.yaml")}
    assert len(shipped) > 40 and shipped <= names, sorted(shipped - names)
    assert "hydra_plugins/llm_optuna_sweeper/llm_optuna_sweeper.py" in names
    page = {f"llm/serving/static/{n}" for n in ("index.html", "app.js", "style.css")}
    assert page <= names, sorted(page - names)  # llm serve's chat page

    python, purelib = _fresh_venv(tmp_path)
    install = ["--python", str(python), "install", "--no-deps", "--no-index", str(wheel)]
    installed = _run([*PIP, *install], tmp_path, env)
    assert installed.returncode == 0, installed.stdout + installed.stderr

    work = tmp_path / "work"  # not the checkout, and nothing of it on the path
    work.mkdir()
    where = _run([str(python), "-c", _WHERE], work, env)
    assert where.returncode == 0, where.stderr
    module, sweeper = (Path(p).resolve() for p in where.stdout.split())
    assert module == purelib.resolve() / "llm" / "__init__.py"  # the wheel's, not the checkout's
    assert sweeper.parent == purelib.resolve() / "hydra_plugins" / "llm_optuna_sweeper"

    llm = str(python.parent / "llm")
    shown = _run([llm, "train", "--help"], work, env)
    assert shown.returncode == 0, shown.stderr
    listed = shown.stdout.split("config groups")[1].split("keys (")[0]
    groups = {line.split()[0]: line.split()[1:] for line in listed.splitlines() if line[:1] == " "}
    assert "[tinyshakespeare]" in groups["data"] and "tiny" in groups["model"]
    assert "[cpu]," in groups["trainer"]
    assert "shakespeare_char_cpu_optuna" in groups["hparams_search"]

    corpus = write_corpus(work)
    args = [o for o in tiny_overrides(work, corpus) if not o.startswith("paths.")]
    steps = ["trainer.max_steps=5", "trainer.val_check_interval=5", "trainer.limit_val_batches=1"]
    trained = _run([llm, "train", *args, *steps], work, env)
    assert trained.returncode == 0, trained.stdout + trained.stderr
    (run,) = (work / "logs" / "train" / "runs").iterdir()  # paths.root_dir is the cwd
    assert f"Run folder:      {run}" in trained.stdout
    best = re.search(r"^Best val/loss:   (\d+\.\d+) at step (\d+)$", trained.stdout, re.M)
    assert best and 0 < float(best[1]) < 10 and best[2] == "5", trained.stdout
    assert (run / "checkpoints" / "last.ckpt").is_file()

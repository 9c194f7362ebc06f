"""The package's shape: no import cycles, the library apart from the command line, and a
``--help`` that imports neither torch nor Lightning (which is what keeps it fast)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ENV, ROOT

PACKAGE = ROOT / "llm"


def _modules() -> dict[str, Path]:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[tuple[str, str]]:
    """(module, imported name) for every import in the file, at any depth, except those under
    ``if TYPE_CHECKING:`` (they never run)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for n in ast.walk(node)
    }
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[tuple[str, str]] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {(a.name, "") for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package[: len(package) - node.level + 1]
                base = ".".join([*parent, *([base] if base else [])])
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.add((sub, "") if sub in modules else (base, a.name))
    return found


def _owner(target: str, modules: dict[str, Path]) -> str | None:
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or None


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for target, _ in _imports(name, path, modules):
            owner = _owner(target, modules)
            if owner is not None and owner != name:
                graph[name].add(owner)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_checker_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_in_llm() -> None:
    graph = _graph()
    # the graph holds edges that are there: a package's own import, a lazy one, a from-import
    assert len(graph) > 30 and "llm.model.gpt" in graph["llm.model"]
    assert {"llm.model.build", "llm.training.optim"} <= graph["llm.training.task"]
    assert "llm.model.lora" in graph["llm.model.build"]  # inside build_model
    assert "llm.model" in graph["llm.memory"]  # inside parameter_count
    assert _cycles(graph) == []


# Lowest first; a module may import from its own layer and those below, never from above.
LAYERS = [
    (
        "llm.io",
        "llm.faults",
        "llm.interrupts",
        "llm.checks",
        "llm.heatmaps",
        "llm.ranks",
    ),  # utilities, no model
    ("llm.tokenizers",),
    ("llm.model",),
    # built on the model and tokenizers, used by the stages: the data pipeline, prompt
    # templates (text only), text-in text-out sampling, memory estimates (count the model)
    ("llm.data", "llm.prompts", "llm.inference", "llm.memory"),
    ("llm.evaluation", "llm.finetuning", "llm.training", "llm.sweeps", "llm.inspection"),
    # loading what the stages wrote: checkpoints of any kind (it knows the Lightning modules),
    # the weights init= starts from (read through it), chat, and serving (chat over HTTP)
    ("llm.checkpoint", "llm.initial_weights", "llm.chat", "llm.serving"),
    # the one fit and its tasks: they resume from checkpoints and start from init= weights
    ("llm.training.run", "llm.training.trainer", "llm.training.pretrain", "llm.finetuning.tasks"),
    ("llm.cli", "llm.__main__", "llm"),  # the commands, and the package's lazy facade
]
# Imports known to run upward, each with the issue that will remove it: none today.
KNOWN_UPWARD: set[tuple[str, str]] = set()


def _layer(module: str) -> int | None:
    """The index of the LAYERS entry naming `module` or the package nearest above it (``llm``
    itself names only the package's __init__, so a new top-level module has no layer until
    placed)."""
    best: tuple[int, int] | None = None  # (length of the name matched, layer)
    for i, names in enumerate(LAYERS):
        for name in names:
            inside = module == name or (name != "llm" and module.startswith(name + "."))
            if inside and (best is None or len(name) > best[0]):
                best = (len(name), i)
    return None if best is None else best[1]


def _upward(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    out = set()
    for module, targets in graph.items():
        for target in targets:
            a, b = _layer(module), _layer(target)
            if a is not None and b is not None and b > a:
                out.add((module, target))
    return out


def test_the_layer_checker_finds_an_upward_import() -> None:
    graph = {"llm.model.gpt": {"llm.training.module", "llm.checks"}, "llm.cli.train": {"llm"}}
    assert _upward(graph) == {("llm.model.gpt", "llm.training.module")}
    assert (
        _layer("llm") == len(LAYERS) - 1 and _layer("llm.io") == 0 and _layer("llm.model.lora") == 2
    )
    assert _layer("llm.training.run") == 6 and _layer("llm.training.task") == 4  # nearest name
    assert _layer("llm.something_new") is None


def test_every_module_has_a_layer_and_no_import_runs_up() -> None:
    """The graph (module-level and function-level imports) follows LAYERS: the model knows
    nothing of training, training nothing of checkpoints or the command line."""
    graph = _graph()
    assert [m for m in graph if _layer(m) is None] == []  # a new top-level module: place it
    assert sorted(_upward(graph) - KNOWN_UPWARD) == []
    assert sorted(KNOWN_UPWARD - _upward(graph)) == []  # a fixed exception: strike it


def test_the_library_imports_no_entry_point() -> None:
    graph = _graph()
    library = [m for m in graph if not m.startswith(("llm.cli", "llm.__main__"))]
    offenders = {m: sorted(t for t in graph[m] if t.startswith("llm.cli")) for m in library}
    assert {m: t for m, t in offenders.items() if t} == {}


def test_entry_points_share_no_private_helpers() -> None:
    modules = _modules()
    private = [
        (name, target, attr)
        for name, path in modules.items()
        if name.startswith("llm.cli")
        for target, attr in _imports(name, path, modules)
        if target.startswith("llm.cli") and attr.startswith("_")
    ]
    assert private == []


@pytest.mark.slow
@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["generate", "--help"]])
def test_help_imports_neither_torch_nor_lightning(argv: list[str]) -> None:
    """Importing torch takes seconds and Lightning ten more: help must not wait for them."""
    code = (
        "import sys\nfrom llm.cli import main\nmain(sys.argv[1:])\n"
        "heavy = [m for m in ('torch', 'lightning') if m in sys.modules]\n"
        "print('HEAVY', heavy, file=sys.stderr)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, *argv], env=ENV, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stderr
    assert proc.stdout.startswith("usage: llm" if argv == ["--help"] else f"llm {argv[0]}:")

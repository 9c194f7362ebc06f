"""The views as pictures: PNG files and TensorBoard images of the logit lens, the ablation and
the patching grids, and the attention heat maps the training callback draws. Bare Agg figures
(no pyplot, nothing global), one per call."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from llm.heatmaps import heatmap_figure, visible
from llm.io import atomic_path

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

CELL, DPI, LABEL_CHARS = 30, 100, 8  # a grid cell in px, and the most characters of a label


def _short(piece: str) -> str:
    shown = visible(piece)
    return shown if len(shown) <= LABEL_CHARS else shown[: LABEL_CHARS - 1] + "…"


def _grid(
    values: np.ndarray,
    cmap: str,
    limits: tuple[float, float],
    title: str,
    x_labels: list[str],
    y_labels: list[str],
    x_title: str,
    y_title: str,
    text: list[list[str]] | None = None,
    cell: int = CELL,
) -> Figure:
    """One (rows, columns) heat map, ``cell`` px a cell, rows bottom-up, a colour bar beside it;
    ``text``: each cell's own words. ``title``'s lines are its heading."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows, cols = values.shape
    width, height = max(cols * cell + 200, 440), rows * CELL + 170
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax: Axes = fig.add_subplot()
    image = ax.imshow(values, cmap=cmap, vmin=limits[0], vmax=limits[1], origin="lower")
    ax.set_aspect("auto")
    upright = max(map(len, x_labels), default=0) > 2
    ax.set_xticks(range(cols), x_labels, rotation=90 if upright else 0, fontsize=7)
    ax.set_yticks(range(rows), y_labels, fontsize=7)
    ax.set_xlabel(x_title, fontsize=8)
    ax.set_ylabel(y_title, fontsize=8)
    ax.set_title(title, fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02).ax.tick_params(labelsize=7)
    if text is not None:
        for r in range(rows):
            for c in range(cols):
                red, green, blue, _ = image.cmap(image.norm(values[r, c]))
                dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5  # luma of the cell
                ax.text(c, r, text[r][c], ha="center", va="center", fontsize=6,
                        color="white" if dark else "black")  # fmt: skip
    return fig


def lens_figure(lens: dict) -> Figure:
    """Token x point: the lens's top token in each cell, coloured by its probability."""
    probs = np.array([[cell[0]["prob"] for cell in row] for row in lens["top"]])
    words = [[_short(cell[0]["token"]) for cell in row] for row in lens["top"]]
    return _grid(
        probs, "viridis", (0.0, 1.0),
        "logit lens: the top next token read out after each block\n(colour: its probability)",
        [_short(t) for t in lens["tokens"]], lens["points"],
        "input token (the prediction is of the token after it)", "residual stream after",
        words,
    )  # fmt: skip


def ablation_figure(ablation: dict) -> Figure:
    """Layer x head: how much the loss rises when that head is zeroed."""
    rise = np.array(ablation["increase"])
    bound = max(float(np.abs(rise).max()), 1e-6)
    text = [[f"{v:+.3f}" for v in row] for row in rise]
    return _grid(
        rise, "RdBu_r", (-bound, bound),
        f"loss increase with one head zeroed\n(base loss {ablation['base']:.4f}, "
        f"{ablation['tokens_scored']} tokens)",
        [str(h) for h in range(rise.shape[1])], [str(layer) for layer in range(rise.shape[0])],
        "head", "layer", text, cell=48,
    )  # fmt: skip


def patching_figure(patching: dict) -> Figure:
    """Point x position: the share of the clean answer's logit difference that patching the
    clean stream there restores."""
    effect = np.array(patching["effect"])
    bound = max(1.0, float(np.abs(effect).max()))
    labels = [
        _short(a) if a == b else f"{_short(b)}→{_short(a)}"
        for a, b in zip(patching["tokens"], patching["corrupt_tokens"], strict=True)
    ]
    return _grid(
        effect, "RdBu_r", (-bound, bound),
        f"activation patching: share of logit({visible(patching['answer'])}) - "
        f"logit({visible(patching['wrong'])}) restored\n(clean run 1 = "
        f"{patching['clean_diff']:.2f}, corrupt run 0 = {patching['corrupt_diff']:.2f})",
        labels, patching["points"], "position (corrupt→clean token)", "residual stream after",
    )  # fmt: skip


def attention_figures(attention: dict) -> list[Figure]:
    """One figure per layer, all its heads (the training callback's heat maps)."""
    return [
        heatmap_figure(np.array(maps), attention["tokens"], f"layer {layer}")
        for layer, maps in enumerate(attention["maps"])
    ]


def image(fig: Figure) -> np.ndarray:
    """The figure as an (H, W, 3) uint8 array (TensorBoard's add_image, dataformats="HWC")."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()  # type: ignore[attr-defined]


def save_png(fig: Figure, path: str | Path) -> Path:
    """Write the figure as a PNG, atomically."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return Path(path)


def figures(results: dict[str, dict]) -> dict[str, Figure]:
    """Each view's figures by name (``lens``, ``attention_layer0``, ...), for the views present
    in ``results`` (view name -> its result); the next-token view is a table, not a figure."""
    drawn: dict[str, Figure] = {}
    if "lens" in results:
        drawn["lens"] = lens_figure(results["lens"])
    if "attention" in results:
        for layer, fig in enumerate(attention_figures(results["attention"])):
            drawn[f"attention_layer{layer}"] = fig
    if "ablation" in results:
        drawn["ablation"] = ablation_figure(results["ablation"])
    if "patching" in results:
        drawn["patching"] = patching_figure(results["patching"])
    return drawn


def write_figures(
    results: dict[str, dict], out_dir: str | Path, tensorboard: bool = True
) -> list[Path]:
    """The figures as ``<out_dir>/<name>.png`` and, with ``tensorboard``, as TensorBoard images
    under ``inspect/<name>`` in an events file of ``out_dir``; the files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    drawn = figures(results)
    paths = [save_png(fig, out / f"{name}.png") for name, fig in drawn.items()]
    if tensorboard and drawn:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(str(out)) as writer:
            for name, fig in drawn.items():
                writer.add_image(f"inspect/{name}", image(fig), 0, dataformats="HWC")
        paths.append(max(out.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime))
    return paths

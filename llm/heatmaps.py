"""Heat maps of attention weights, one square per head with the tokens on its axes: drawn by
the training callback at each validation and by ``llm inspect``. Bare Agg figures (no pyplot),
so any one thread may draw them and nothing global holds them."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from matplotlib.figure import Figure


# whitespace made visible, so the token a head attends to can be read off the axis
_VISIBLE = {" ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍"}


def visible(piece: str) -> str:
    """A token's text with its whitespace drawn (␣, ↵, ⇥) and other control characters escaped."""
    out = "".join(_VISIBLE.get(c, c if c.isprintable() else repr(c)[1:-1]) for c in piece)
    return out or "∅"


# a heat map's geometry: a token's row and column are CELL pixels at DPI, so the default
# max_tokens (20) fits in 330 px, narrower than an IMAGES card (350 px): labels at full size
CELL, DPI, MIN_SIDE, LABEL_CHARS = 12, 100, 180, 6
# the colour scale, always 0..1 (softmax weights): said in the heading, no colour bar
SCALE = "weight 0 (dark) to 1 (yellow)"


def heading(title: str) -> str:
    """A heat map figure's heading: ``title`` (its layer) and the colour scale."""
    return f"{title} · {SCALE}" if title else SCALE


def _label(piece: str) -> str:
    """A token's axis label: whitespace drawn, cut to LABEL_CHARS so the margins stay small."""
    shown = visible(piece)
    return shown if len(shown) <= LABEL_CHARS else shown[: LABEL_CHARS - 1] + "…"


def heatmap_figure(
    maps: torch.Tensor | np.ndarray,
    labels: list[str] | None = None,
    title: str = "",
    first_head: int = 0,
) -> Figure:
    """A grid of (T, T) heat maps, one per head: query rows, key columns, a token's row and
    column CELL px wide (the default 20 tokens: at most 330 px, readable in IMAGES' 350 px card
    without "Show actual image size"); token labels on the axes (whitespace visible) while they
    stay legible (T <= 48). The scale is 0..1 (the heading says so), so no colour bar.

    The margins are measured from the drawn labels rather than guessed (tight_layout left the
    square heat maps floating in slack it could not use). A bare Agg figure (no pyplot):
    nothing global holds it, so it needs no closing and may be drawn on any one thread."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    maps = maps.numpy() if isinstance(maps, torch.Tensor) else maps
    n_head, t = maps.shape[0], maps.shape[-1]
    cols = min(n_head, 4)
    rows = (n_head + cols - 1) // cols
    side = max(CELL * t, MIN_SIDE)  # px
    room = side + 200  # a first canvas, with room around a head to measure its labels in
    fig = Figure(figsize=(room / DPI, room / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = [fig.add_axes((0.0, 0.0, 1.0, 1.0)) for _ in range(n_head)]
    for h, ax in enumerate(axes):
        ax.imshow(maps[h], cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(f"head {first_head + h}", fontsize=8, pad=3)
        ax.set_xlabel("key (attended to)", fontsize=7, labelpad=2)
        ax.set_ylabel("query (attending)", fontsize=7, labelpad=2)
        ax.tick_params(length=2, pad=1)
        if labels is not None and t <= 48:
            shown = [_label(s) for s in labels]
            ax.set_xticks(range(t), shown, rotation=90, fontsize=7)
            ax.set_yticks(range(t), shown, fontsize=7)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
    top = fig.suptitle(heading(title), fontsize=8, va="top")
    # one head's labels around its square, measured where there is room for them
    pad = 4
    axes[0].set_position((100 / room, 100 / room, side / room, side / room))
    renderer = fig.canvas.get_renderer()
    inner, outer = axes[0].get_window_extent(renderer), axes[0].get_tightbbox(renderer)
    # whole pixels, so that the frame a reused figure draws again falls where it was
    left, right = math.ceil(inner.x0 - outer.x0) + pad, math.ceil(outer.x1 - inner.x1) + pad
    below, above = math.ceil(inner.y0 - outer.y0) + pad, math.ceil(outer.y1 - inner.y1)
    head_w, head_h = side + left + right, side + below + above
    heading_box = top.get_window_extent(renderer)
    width = max(cols * head_w, math.ceil(heading_box.width) + 2 * pad)
    height = rows * head_h + math.ceil(heading_box.height) + 2 * pad
    fig.set_size_inches(width / DPI, height / DPI)
    x_shift = (width - cols * head_w) // 2
    for h, ax in enumerate(axes):
        row, col = divmod(h, cols)
        x0 = x_shift + col * head_w + left
        y0 = (rows - 1 - row) * head_h + below
        ax.set_position((x0 / width, y0 / height, side / width, side / height))
    top.set_y(1.0 - pad / height)
    return fig


class HeatmapCanvas:
    """One head's heat map figure, drawn in full once (axes, token labels) and then reused:
    each head's image, title and heading (its layer) are drawn over the saved background, a
    few ms rather than the ~0.5 s of laying out and drawing a new figure per head.

    Not thread-safe: one thread renders with it (the callback's background thread)."""

    def __init__(self, t: int, labels: list[str] | None) -> None:
        self.t, self.labels = t, labels
        # placeholders while the layout is computed, so it leaves room for both titles
        self.figure = heatmap_figure(np.zeros((1, t, t)), labels, "layer 0")
        self.axes = self.figure.axes[0]
        self.image = self.axes.images[0]
        self.title = self.axes.title
        self.suptitle = self.figure._suptitle  # heatmap_figure's (fig.suptitle() would reset it)
        assert self.suptitle is not None
        self.title.set_text("")
        self.suptitle.set_text("")
        # the frame is drawn with each image, once: drawn twice its antialiased edge darkens
        self.spines = list(self.axes.spines.values())
        for spine in self.spines:
            spine.set_visible(False)
        canvas = self.figure.canvas
        canvas.draw()
        self.frame = canvas.copy_from_bbox(self.figure.bbox)  # all but what changes
        for spine in self.spines:
            spine.set_visible(True)

    def render(self, weights: np.ndarray, layer: int, head: int) -> np.ndarray:
        """The figure of one head's (T, T) weights as an (H, W, 3) uint8 image."""
        canvas = self.figure.canvas
        self.image.set_data(weights)
        self.title.set_text(f"head {head}")
        self.suptitle.set_text(heading(f"layer {layer}"))
        canvas.restore_region(self.frame)
        for artist in (self.image, *self.spines, self.title):
            self.axes.draw_artist(artist)
        self.figure.draw_artist(self.suptitle)
        return np.asarray(canvas.buffer_rgba())[..., :3].copy()

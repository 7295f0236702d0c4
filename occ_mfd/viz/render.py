"""Headless rendering of whole sequences: one composed image per time step (past | GT future |
prediction | error, titled, with time labels and a class legend) and animation files (.png/.gif/.mp4).

The per-grid image comes from a renderer of :mod:`occ_mfd.viz.backends` (Open3D offscreen when it works,
else the bird's-eye fallback with a one-line notice).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from occ_mfd.atomic import atomic_path
from occ_mfd.grid import FREE_ID, KEYFRAME_DT_S, PALETTE
from occ_mfd.viz.backends import BEVRenderer, Open3DRenderer, RendererUnavailable, make_renderer  # noqa: F401
from occ_mfd.viz.forecast_io import ForecastRecord
from occ_mfd.viz.geometry import ERR_FREE, ERROR_NAMES, ERROR_PALETTE, error_labels, legend_entries

VIEWS = ("past", "gt", "pred", "error")
VIEW_TITLES = {"past": "past (observed)", "gt": "ground-truth future", "pred": "prediction",
               "error": "error (pred vs GT)"}


def frame_time_s(t: int, num_past: int, dt: float = KEYFRAME_DT_S) -> float:
    """Seconds of time step ``t`` relative to the current (last observed) frame, index ``num_past - 1``."""
    return (t - (num_past - 1)) * dt


def panel_grids(rec: ForecastRecord, t: int, views=VIEWS):
    """The label grid to draw in each view at time step ``t`` (0 … P+F-1), as ``{view: (grid, kind)}``
    with kind "sem" (class palette) or "err" (error palette); None where the view has nothing then.
    During the history only "past" is drawn; during the future "past" holds the last observed frame."""
    P = rec.num_past
    out = {}
    for v in views:
        if v == "past":
            out[v] = (rec.past[min(t, P - 1)], "sem")
        elif t < P or (v in ("pred", "error") and rec.pred is None):
            out[v] = None
        elif v == "gt":
            out[v] = (rec.future_gt[t - P], "sem")
        elif v == "pred":
            out[v] = (rec.pred[t - P], "sem")
        elif v == "error":
            out[v] = (error_labels(rec.pred[t - P], rec.future_gt[t - P])[0], "err")
        else:
            raise ValueError(f"unknown view {v!r}: choose from {VIEWS}")
    return out


def _draw(renderer, grid_kind, rec, camera, classes):
    grid, kind = grid_kind
    if kind == "err":
        return renderer.render(grid, rec.grid, camera, palette=ERROR_PALETTE, hide=(ERR_FREE,))
    return renderer.render(grid, rec.grid, camera, palette=PALETTE, hide=(FREE_ID,), classes=classes)


def _figure(figsize: tuple[float, float], dpi: int):
    """A standalone matplotlib figure drawn by the Agg canvas: no pyplot (no global figure registry to
    close), and the process's matplotlib backend is left as the caller set it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def render_sequence(rec: ForecastRecord, renderer=None, camera: str = "bev", views=None, classes=None,
                    panel_size=(480, 360), dpi: int = 100, progress: bool = True) -> list[np.ndarray]:
    """Render every time step (P past + F future) of ``rec`` as one composed RGB image (H, W, 3) uint8.

    Args:
        renderer: a backend renderer (made with ``make_renderer("auto", *panel_size)`` when None).
        views: subset of ("past", "gt", "pred", "error"); default all, or past/gt without a prediction.
        classes: optional class-id filter for the semantic views.
    """
    from matplotlib.patches import Patch

    views = tuple(views) if views else (VIEWS if rec.pred is not None else ("past", "gt"))
    own = renderer is None
    renderer = renderer or make_renderer("auto", *panel_size)
    grids = [rec.past, rec.future_gt] + ([rec.pred] if rec.pred is not None else [])
    handles = [Patch(color=np.array(rgb) / 255, label=name)
               for _, name, rgb in legend_entries(*grids) if classes is None or _ in classes]
    if "error" in views:
        handles += [Patch(color=ERROR_PALETTE[i] / 255, label=ERROR_NAMES[i]) for i in range(1, 5)]
    frames, cache = [], {}
    T = rec.num_past + rec.num_future
    try:
        for t in tqdm(range(T), desc="render", disable=not progress, leave=False):
            panels = panel_grids(rec, t, views)
            fig = _figure((len(views) * panel_size[0] / dpi, panel_size[1] / dpi + 1.1), dpi)
            axes = fig.subplots(1, len(views), squeeze=False)
            for ax, v in zip(axes[0], views):
                ax.set_axis_off()
                if panels[v] is None:
                    ax.set_title(VIEW_TITLES[v], fontsize=10)
                    ax.text(0.5, 0.5, "— (history) —", ha="center", va="center", transform=ax.transAxes)
                    continue
                key = (v, min(t, rec.num_past - 1)) if v == "past" else (v, t)
                if key not in cache:
                    cache[key] = _draw(renderer, panels[v], rec, camera, classes)
                ax.imshow(cache[key])
                ts = frame_time_s(key[1], rec.num_past)
                ax.set_title(f"{VIEW_TITLES[v]}  {ts:+.1f} s", fontsize=10)
            ts = frame_time_s(t, rec.num_past)
            fig.suptitle(f"{rec.scene or 'sequence'}  {rec.name}  t = {ts:+.1f} s "
                         f"({'observed' if t < rec.num_past else 'future'})", fontsize=11)
            if handles:
                fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 9), fontsize=7,
                           frameon=False)
            # fixed margins: tight_layout costs ~0.5 s a frame
            rows = -(-len(handles) // 9)          # legend rows below the panels
            fig.subplots_adjust(left=0.01, right=0.99, bottom=0.03 + 0.045 * rows, top=0.86, wspace=0.03)
            fig.canvas.draw()
            frames.append(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy())
    finally:
        if own:
            renderer.close()
    return frames


def save_animation(frames: list[np.ndarray], path: str | os.PathLike, fps: float = 2.0) -> Path:
    """Write frames atomically: ``.png`` (one frame, or all stacked vertically as a strip), ``.gif``
    (imageio, looping) or ``.mp4`` (needs the ``imageio-ffmpeg`` package)."""
    import imageio.v2 as iio

    path = Path(path)
    if not frames:
        raise ValueError(f"{path}: no frames to write")
    suffix = path.suffix.lower()
    if suffix not in (".png", ".gif", ".mp4"):
        raise ValueError(f"{path}: unsupported output type {suffix!r}; use .png, .gif or .mp4")
    if suffix == ".mp4":
        try:
            import imageio_ffmpeg  # noqa: F401
        except ImportError:
            raise RuntimeError(f"{path}: writing .mp4 needs the imageio-ffmpeg package "
                               "(pip install imageio-ffmpeg); or render a .gif instead") from None
    with atomic_path(path, suffix=suffix) as tmp:
        if suffix == ".png":
            w = max(f.shape[1] for f in frames)
            pad = [np.pad(f, ((0, 0), (0, w - f.shape[1]), (0, 0)), constant_values=255) for f in frames]
            iio.imwrite(tmp, np.concatenate(pad, axis=0), format="png")
        elif suffix == ".gif":
            iio.mimsave(tmp, frames, format="gif", duration=1000.0 / fps, loop=0)
        else:
            iio.mimsave(tmp, frames, format="FFMPEG", fps=fps, macro_block_size=1)
    return path

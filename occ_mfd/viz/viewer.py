"""Interactive Open3D viewer of one :class:`ForecastRecord` (keys below), and its display-free state
machine :class:`ViewerState` (what is shown; tested without a window).

Keys: ←/→ step in time · space play/pause · 1–4 past / GT future / prediction / error · C cycle a class
filter · B bird's-eye / chase camera · S save a screenshot · H print this help.

Each view steps through the times it has (the ground truth, prediction and error only exist in the future);
switching to a view with nothing at the current time jumps to the nearest time it has. The window title says
which view, time, class filter and camera are shown (on X11; elsewhere the terminal lines do).

Messages (what is shown, play/pause, saved screenshots, this help) go to the ``logging`` logger
``occ_mfd.viz.viewer`` at INFO; ``visualize/view.py`` prints them.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from occ_mfd.grid import FREE_ID, OCC3D_CLASSES, PALETTE
from occ_mfd.viz.forecast_io import ForecastRecord
from occ_mfd.viz.geometry import (ERR_FREE, ERROR_NAMES, ERROR_PALETTE, camera_preset, cube_mesh, ego_box,
                                  exposed_faces, legend_entries, voxel_centers)
from occ_mfd.viz.render import VIEWS, frame_time_s, panel_grids
from occ_mfd.viz.x11 import NO_WINDOW_ADVICE, WindowTitle, display_problem

log = logging.getLogger(__name__)

HELP = __doc__.split("\n\n")[1]
# GLFW key codes (what VisualizerWithKeyCallback passes through).
KEY_RIGHT, KEY_LEFT, KEY_SPACE = 262, 263, 32
PLAY_INTERVAL_S = 0.5


@dataclass
class ViewerState:
    """Time step, view, class filter and camera of the viewer. ``t`` runs over the P past and F future
    frames (0 … P+F-1); a view is only shown at the times it has (:meth:`times`): stepping wraps around
    within them, and switching to a view that has nothing at ``t`` jumps to the nearest time it has."""

    rec: ForecastRecord
    t: int = 0
    view: str = "past"
    camera: str = "chase"
    playing: bool = False
    class_filter: int | None = None            # None: all classes
    shots: int = 0
    classes_present: list[int] = field(default_factory=list)

    def __post_init__(self):
        grids = [self.rec.past, self.rec.future_gt] + ([self.rec.pred] if self.rec.pred is not None else [])
        self.classes_present = [i for i, _, _ in legend_entries(*grids)]

    @property
    def num_steps(self) -> int:
        return self.rec.num_past + self.rec.num_future

    def times(self, view: str | None = None) -> list[int]:
        """The time steps at which ``view`` (default: the current one) has something to draw, as
        :func:`~occ_mfd.viz.render.panel_grids` says: all of them for "past" (during the future it holds the
        last observed frame), the F future ones for "gt", and for "pred"/"error" too when the record has a
        prediction (none without)."""
        view = self.view if view is None else view
        if view not in VIEWS:
            raise ValueError(f"unknown view {view!r}: choose from {VIEWS}")
        P, T = self.rec.num_past, self.num_steps
        if view == "past":
            return list(range(T))
        if view == "gt" or self.rec.pred is not None:
            return list(range(P, T))
        return []

    def _seconds(self, t: int) -> str:
        return f"{frame_time_s(t, self.rec.num_past):+.1f}s"

    def step(self, d: int) -> None:
        """Move ``d`` steps through the current view's times, wrapping around."""
        ts = self.times()
        i = ts.index(_nearest(ts, self.t))
        self.t = ts[(i + d) % len(ts)]

    def set_view(self, k: int) -> str | None:
        """k = 1..4 → past, gt, pred, error. Returns a note when that view has nothing at the current time
        (it then jumps to the nearest time it has) or nothing at all (the view stays as it was)."""
        view = VIEWS[k - 1]
        ts = self.times(view)
        if not ts:
            return f"{view}: nothing to show, this record has no prediction (ground truth only); still on {self.view}"
        self.view = view
        if self.t in ts:
            return None
        was, self.t = self.t, _nearest(ts, self.t)
        when = "history" if was < self.rec.num_past else "future"
        return f"{view}: nothing at t={self._seconds(was)} ({when}); jumped to t={self._seconds(self.t)}"

    def cycle_class(self) -> None:
        """All → each class present in turn → all."""
        opts = [None] + self.classes_present
        self.class_filter = opts[(opts.index(self.class_filter) + 1) % len(opts)]

    def toggle_camera(self) -> None:
        self.camera = "bev" if self.camera == "chase" else "chase"

    def current(self):
        """(labels (X, Y, Z), palette, hide, classes, title) to draw now, or None when the view is empty."""
        pg = panel_grids(self.rec, self.t, (self.view,))[self.view]
        if pg is None:
            return None
        shown = min(self.t, self.rec.num_past - 1) if self.view == "past" else self.t
        title = f"{self.view} t={self._seconds(shown)}"
        if shown != self.t:
            title += f" (last observed; now {self._seconds(self.t)})"
        grid, kind = pg
        if kind == "err":
            return grid, ERROR_PALETTE, (ERR_FREE,), None, title
        cls = None if self.class_filter is None else [self.class_filter]
        return grid, PALETTE, (FREE_ID,), cls, title + ("" if cls is None else f" [{OCC3D_CLASSES[cls[0]]}]")

    def status(self) -> str:
        """One line on what is shown now: the view's title, or that the view is empty at this time."""
        cur = self.current()
        if cur is not None:
            return cur[-1]
        return f"{self.view}: nothing at t={self._seconds(self.t)} (history)"

    def window_title(self) -> str:
        """The window's title: what is shown (:meth:`status`), playing or not, the camera and the record."""
        src = " ".join(x for x in (self.rec.scene, f"({self.rec.name})" if self.rec.name else "") if x)
        parts = [self.status()] + (["playing"] if self.playing else []) + [f"{self.camera} camera"]
        return " | ".join(parts + ([src] if src else []) + ["occ-mfd viewer"])

    def help_text(self) -> str:
        """The key help and the colours of the classes present (and of the error view)."""
        names = [f"{OCC3D_CLASSES[i]}={tuple(PALETTE[i])}" for i in self.classes_present]
        errors = [f"{ERROR_NAMES[i]}={tuple(ERROR_PALETTE[i])}" for i in range(1, 5)]
        return f"{HELP}\nclasses: {', '.join(names)}\nerror view: {', '.join(errors)}"


def _nearest(ts: list[int], t: int) -> int:
    """The element of ``ts`` nearest to ``t`` (the earlier one on a tie)."""
    return min(ts, key=lambda s: (abs(s - t), s))


def key_callbacks(st: ViewerState, redraw: Callable[[bool], None], capture: Callable[[Path], None],
                  screenshot_dir: str | Path = ".") -> dict[int, Callable[[object], bool]]:
    """The viewer's keys, display-free: GLFW key code → Open3D key callback ``cb(vis) -> bool``.

    Each callback updates ``st``, draws through ``redraw(reset_camera)`` or ``capture(png_path)`` and logs
    what it did (logger ``occ_mfd.viz.viewer``, INFO).
    """
    def show(fn, reset=False):
        def cb(_vis):
            note = fn()
            redraw(reset)
            if note:
                log.info(note)
            log.info(st.status())
            return True
        return cb

    def play(_vis):
        st.playing = not st.playing
        log.info("playing" if st.playing else "paused")
        return False

    def shot(_vis):
        path = Path(screenshot_dir) / f"occ_view_{st.shots:03d}.png"
        st.shots += 1
        capture(path)
        log.info("saved %s", path)
        return False

    def help_(_vis):
        log.info(st.help_text())
        return False

    keys = {KEY_RIGHT: show(lambda: st.step(1)), KEY_LEFT: show(lambda: st.step(-1)), KEY_SPACE: play,
            ord("C"): show(st.cycle_class), ord("B"): show(st.toggle_camera, reset=True), ord("S"): shot,
            ord("H"): help_}
    for k in range(1, 5):
        keys[ord(str(k))] = show(lambda k=k: st.set_view(k))
    return keys


class NoDisplayError(RuntimeError):
    """No window can be opened here; the message is one line saying what to do instead."""


def run_viewer(rec: ForecastRecord, screenshot_dir: str | Path = ".", width: int = 1280, height: int = 800):
    """Open the interactive window (needs a display). Blocks until the window is closed.

    Raises :class:`NoDisplayError` (before Open3D is touched) when no display can be opened: Open3D would
    otherwise fall back to an invisible offscreen context and wait forever for keys that never come.
    """
    problem = display_problem()
    if problem:
        raise NoDisplayError(problem)
    import open3d as o3d

    st = ViewerState(rec)
    vis = o3d.visualization.VisualizerWithKeyCallback()
    first_title = st.window_title()
    if not vis.create_window(window_name=first_title, width=width, height=height):
        raise NoDisplayError(f"could not open an OpenGL window on DISPLAY={os.environ.get('DISPLAY', '')} (Open3D's "
                             "lines above say why; over ssh -X the local X server must allow indirect GLX): "
                             f"{NO_WINDOW_ADVICE}")
    title = None                          # None off X11: the terminal lines then say what is shown
    for _ in range(20):                   # the window's properties may reach the server a moment later
        title = WindowTitle.find(first_title)
        if title is not None:
            break
        time.sleep(0.05)
    vis.get_render_option().light_on = False
    last_step = [0.0]

    def show_title():
        if title is not None:
            title.set(st.window_title())

    def redraw(reset_camera=False):
        vis.clear_geometries()
        cur = st.current()
        if cur is not None:
            sem, pal, hide, cls, _ = cur
            c, _, col = voxel_centers(sem, rec.grid, hide=hide, classes=cls, palette=pal)
            if len(c):
                keep = ~np.isin(sem, hide) if cls is None else np.isin(sem, cls)
                m = cube_mesh(c, rec.grid.voxel_size, col, faces=exposed_faces(keep))
                mesh = o3d.geometry.TriangleMesh(o3d.utility.Vector3dVector(m.vertices),
                                                 o3d.utility.Vector3iVector(m.triangles.astype(np.int32)))
                mesh.vertex_colors = o3d.utility.Vector3dVector(m.colors / 255.0)
                vis.add_geometry(mesh, reset_bounding_box=reset_camera)
        corners, edges = ego_box()
        ls = o3d.geometry.LineSet(o3d.utility.Vector3dVector(corners), o3d.utility.Vector2iVector(edges))
        ls.paint_uniform_color([0, 0, 0])
        vis.add_geometry(ls, reset_bounding_box=False)
        if reset_camera:
            set_camera()

    def set_camera():
        cam = camera_preset(st.camera, rec.grid)
        ctr = vis.get_view_control()
        ctr.set_lookat(cam.center)
        ctr.set_front(np.subtract(cam.eye, cam.center) / np.linalg.norm(np.subtract(cam.eye, cam.center)))
        ctr.set_up(cam.up)
        ctr.set_zoom(0.45 if st.camera == "bev" else 0.3)

    def animate(_vis):
        """Registered only while playing (an animation callback makes Open3D poll and redraw non-stop);
        sleeps between steps so that playing does not spin a core either."""
        wait = PLAY_INTERVAL_S - (time.monotonic() - last_step[0])
        if wait > 0:
            time.sleep(min(wait, 0.05))
            return False
        last_step[0] = time.monotonic()
        st.step(1)
        redraw()
        log.info(st.status())
        show_title()
        return True

    def with_title(cb):
        def run(v):
            was_playing = st.playing
            out = cb(v)
            if st.playing != was_playing:
                last_step[0] = time.monotonic()
                vis.register_animation_callback(animate if st.playing else None)
            show_title()
            return out
        return run

    capture = lambda path: vis.capture_screen_image(str(path), do_render=True)
    for code, cb in key_callbacks(st, redraw, capture, screenshot_dir).items():
        vis.register_key_callback(code, with_title(cb))
    log.info(st.help_text())
    redraw(reset_camera=True)
    log.info(st.status())
    try:
        vis.run()
    finally:
        if title is not None:
            title.close()
        vis.destroy_window()

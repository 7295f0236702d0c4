"""Interactive Open3D viewer of one :class:`ForecastRecord` (keys below), and its display-free state
machine :class:`ViewerState` (what is shown; tested without a window).

Keys: ←/→ step in time · space play/pause · 1–4 past / GT future / prediction / error · C cycle a class
filter · B bird's-eye / chase camera · S save a screenshot · H print this help.

Messages (what is shown, play/pause, saved screenshots, this help) go to the ``logging`` logger
``occ_mfd.viz.viewer`` at INFO; ``visualize/view.py`` prints them.
"""
from __future__ import annotations

import logging
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

log = logging.getLogger(__name__)

HELP = __doc__.split("\n\n")[1]
# GLFW key codes (what VisualizerWithKeyCallback passes through).
KEY_RIGHT, KEY_LEFT, KEY_SPACE = 262, 263, 32
PLAY_INTERVAL_S = 0.5


@dataclass
class ViewerState:
    """Time step, view, class filter and camera of the viewer. ``t`` runs over the P past and F future
    frames; views without content at ``t`` (e.g. the prediction during the history) show nothing."""

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

    def step(self, d: int) -> None:
        self.t = (self.t + d) % self.num_steps

    def set_view(self, k: int) -> None:
        """k = 1..4 → past, gt, pred, error."""
        self.view = VIEWS[k - 1]

    def cycle_class(self) -> None:
        """All → each class present in turn → all."""
        opts = [None] + self.classes_present
        self.class_filter = opts[(opts.index(self.class_filter) + 1) % len(opts)]

    def toggle_camera(self) -> None:
        self.camera = "bev" if self.camera == "chase" else "chase"

    def current(self):
        """(labels (X, Y, Z), palette, hide, classes, title) to draw now, or None when the view is empty."""
        pg = panel_grids(self.rec, self.t, (self.view,))[self.view]
        title = f"{self.view} t={frame_time_s(self.t, self.rec.num_past):+.1f}s"
        if pg is None:
            return None
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
        return f"{self.view}: nothing at t={frame_time_s(self.t, self.rec.num_past):+.1f}s (history)"

    def help_text(self) -> str:
        """The key help and the colours of the classes present (and of the error view)."""
        names = [f"{OCC3D_CLASSES[i]}={tuple(PALETTE[i])}" for i in self.classes_present]
        errors = [f"{ERROR_NAMES[i]}={tuple(ERROR_PALETTE[i])}" for i in range(1, 5)]
        return f"{HELP}\nclasses: {', '.join(names)}\nerror view: {', '.join(errors)}"


def key_callbacks(st: ViewerState, redraw: Callable[[bool], None], capture: Callable[[Path], None],
                  screenshot_dir: str | Path = ".") -> dict[int, Callable[[object], bool]]:
    """The viewer's keys, display-free: GLFW key code → Open3D key callback ``cb(vis) -> bool``.

    Each callback updates ``st``, draws through ``redraw(reset_camera)`` or ``capture(png_path)`` and logs
    what it did (logger ``occ_mfd.viz.viewer``, INFO).
    """
    def show(fn, reset=False):
        def cb(_vis):
            fn()
            redraw(reset)
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


def run_viewer(rec: ForecastRecord, screenshot_dir: str | Path = ".", width: int = 1280, height: int = 800):
    """Open the interactive window (needs a display). Blocks until the window is closed."""
    import open3d as o3d

    st = ViewerState(rec)
    vis = o3d.visualization.VisualizerWithKeyCallback()
    if not vis.create_window(window_name="occ-mfd viewer", width=width, height=height):
        raise RuntimeError("could not open a window (no display?); use --render out.gif for headless output")
    vis.get_render_option().light_on = False
    last_step = [0.0]

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
        if st.playing and time.time() - last_step[0] > PLAY_INTERVAL_S:
            last_step[0] = time.time()
            st.step(1)
            redraw()
            log.info(st.status())
            return True
        return False

    capture = lambda path: vis.capture_screen_image(str(path), do_render=True)
    for code, cb in key_callbacks(st, redraw, capture, screenshot_dir).items():
        vis.register_key_callback(code, cb)
    vis.register_animation_callback(animate)
    log.info(st.help_text())
    redraw(reset_camera=True)
    log.info(st.status())
    vis.run()
    vis.destroy_window()

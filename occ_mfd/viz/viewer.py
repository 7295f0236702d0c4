"""Interactive Open3D viewer of one :class:`ForecastRecord` (keys below), and its display-free state
machine :class:`ViewerState` (what is shown; tested without a window).

Keys: ←/→ step in time · space play/pause · 1–4 past / GT future / prediction / error · C cycle a class
filter · B bird's-eye / chase camera · S save a screenshot · H print this help.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from occ_mfd.grid import FREE_ID, OCC3D_CLASSES, PALETTE
from occ_mfd.viz.forecast_io import ForecastRecord
from occ_mfd.viz.geometry import (ERR_FREE, ERROR_NAMES, ERROR_PALETTE, camera_preset, cube_mesh, ego_box,
                                  exposed_faces, legend_entries, voxel_centers)
from occ_mfd.viz.render import VIEWS, frame_time_s, panel_grids

HELP = __doc__.split("\n\n")[1]
# GLFW key codes (what VisualizerWithKeyCallback passes through).
KEY_RIGHT, KEY_LEFT, KEY_SPACE = 262, 263, 32


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


def run_viewer(rec: ForecastRecord, screenshot_dir: str | Path = ".", width: int = 1280, height: int = 800):
    """Open the interactive window (needs a display). Blocks until the window is closed."""
    import open3d as o3d

    st = ViewerState(rec)
    vis = o3d.visualization.VisualizerWithKeyCallback()
    if not vis.create_window(window_name="occ-mfd viewer", width=width, height=height):
        raise RuntimeError("could not open a window (no display?); use --render out.gif for headless output")
    vis.get_render_option().light_on = False
    state = {"last": 0.0}

    def redraw(reset_camera=False):
        vis.clear_geometries()
        cur = st.current()
        if cur is not None:
            sem, pal, hide, cls, title = cur
            c, _, col = voxel_centers(sem, rec.grid, hide=hide, classes=cls, palette=pal)
            if len(c):
                keep = ~np.isin(sem, hide) if cls is None else np.isin(sem, cls)
                m = cube_mesh(c, rec.grid.voxel_size, col, faces=exposed_faces(keep))
                mesh = o3d.geometry.TriangleMesh(o3d.utility.Vector3dVector(m.vertices),
                                                 o3d.utility.Vector3iVector(m.triangles.astype(np.int32)))
                mesh.vertex_colors = o3d.utility.Vector3dVector(m.colors / 255.0)
                vis.add_geometry(mesh, reset_bounding_box=reset_camera)
            print(title, flush=True)
        else:
            print(f"{st.view}: nothing at t={frame_time_s(st.t, rec.num_past):+.1f}s (history)", flush=True)
        corners, edges = ego_box()
        ls = o3d.geometry.LineSet(o3d.utility.Vector3dVector(corners), o3d.utility.Vector2iVector(edges))
        ls.paint_uniform_color([0, 0, 0])
        vis.add_geometry(ls, reset_bounding_box=False)
        if reset_camera:
            set_camera()
        return False

    def set_camera():
        cam = camera_preset(st.camera, rec.grid)
        ctr = vis.get_view_control()
        ctr.set_lookat(cam.center)
        ctr.set_front(np.subtract(cam.eye, cam.center) / np.linalg.norm(np.subtract(cam.eye, cam.center)))
        ctr.set_up(cam.up)
        ctr.set_zoom(0.45 if st.camera == "bev" else 0.3)

    def key(fn, reset=False):
        def cb(_vis):
            fn()
            redraw(reset)
            return True
        return cb

    def play(_vis):
        st.playing = not st.playing
        print("playing" if st.playing else "paused", flush=True)
        return False

    def animate(_vis):
        import time
        if st.playing and time.time() - state["last"] > 0.5:
            state["last"] = time.time()
            st.step(1)
            redraw()
            return True
        return False

    def shot(_vis):
        path = Path(screenshot_dir) / f"occ_view_{st.shots:03d}.png"
        st.shots += 1
        vis.capture_screen_image(str(path), do_render=True)
        print(f"saved {path}", flush=True)
        return False

    def legend():
        names = [f"{OCC3D_CLASSES[i]}={tuple(PALETTE[i])}" for i in st.classes_present]
        print("classes: " + ", ".join(names))
        print("error view: " + ", ".join(f"{ERROR_NAMES[i]}={tuple(ERROR_PALETTE[i])}" for i in range(1, 5)))

    vis.register_key_callback(KEY_RIGHT, key(lambda: st.step(1)))
    vis.register_key_callback(KEY_LEFT, key(lambda: st.step(-1)))
    vis.register_key_callback(KEY_SPACE, play)
    for k in range(1, 5):
        vis.register_key_callback(ord(str(k)), key(lambda k=k: st.set_view(k)))
    vis.register_key_callback(ord("C"), key(st.cycle_class))
    vis.register_key_callback(ord("B"), key(st.toggle_camera, reset=True))
    vis.register_key_callback(ord("S"), shot)
    vis.register_key_callback(ord("H"), lambda _v: (print(HELP), legend(), False)[-1])
    vis.register_animation_callback(animate)
    print(HELP)
    legend()
    redraw(reset_camera=True)
    vis.run()
    vis.destroy_window()

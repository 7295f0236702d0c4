"""Image renderers of one label grid: Open3D offscreen (EGL through a hidden legacy ``Visualizer``) and a
numpy/matplotlib-free bird's-eye fallback. Both return (H, W, 3) uint8 RGB from the same arguments.

Probed on Debian 12 with open3d-cpu 0.20: ``rendering.OffscreenRenderer`` (Filament) needs Vulkan
("Failed to load vulkan library!"), while ``Visualizer().create_window(visible=False)`` falls back to an
EGL offscreen context on Mesa (packages libegl1 + libegl-mesa0 + libgl1-mesa-dri) — that is what we use.
"""
from __future__ import annotations

import logging

import numpy as np

from occ_mfd.ego import NUSCENES_EGO
from occ_mfd.grid import FREE_ID, PALETTE, GridSpec
from occ_mfd.viz.geometry import CameraPreset, camera_preset, cube_mesh, ego_box, exposed_faces, voxel_centers

log = logging.getLogger(__name__)

BACKGROUND = (255, 255, 255)


def _drawn_mask(sem: np.ndarray, hide, classes) -> np.ndarray:
    keep = ~np.isin(sem, np.asarray(hide, dtype=np.int64))
    if classes is not None:
        keep &= np.isin(sem, np.asarray(list(classes), dtype=np.int64))
    return keep


class RendererUnavailable(RuntimeError):
    """The requested backend cannot render here (missing package, no EGL/display)."""


class Open3DRenderer:
    """Offscreen Open3D renderer (reuse one instance for many images: opening the context costs ~0.5 s).

    Colours are unlit: the cube faces carry baked shading (:data:`geometry.FACE_SHADE`), so top faces show
    the exact palette colour.
    """

    name = "open3d"

    def __init__(self, width: int = 640, height: int = 480):
        try:
            import open3d as o3d
        except ImportError as e:  # pragma: no cover - depends on the install
            raise RendererUnavailable(f"open3d is not installed ({e}); pip install open3d-cpu") from e
        self._o3d, self.width, self.height = o3d, int(width), int(height)
        o3d.utility.set_verbosity_level(o3d.utility.VerbosityLevel.Error)
        self._vis = o3d.visualization.Visualizer()
        if not self._vis.create_window(width=self.width, height=self.height, visible=False):
            raise RendererUnavailable("Open3D could not open an offscreen window (no display and no EGL; "
                                      "on Debian/Ubuntu install libegl1 libegl-mesa0 libgl1-mesa-dri)")
        opt = self._vis.get_render_option()
        opt.light_on = False
        opt.background_color = np.asarray(BACKGROUND, float) / 255

    def render(self, sem: np.ndarray, grid: GridSpec, camera: str | CameraPreset = "bev",
               palette: np.ndarray = PALETTE, hide=(FREE_ID,), classes=None, ego: bool = True) -> np.ndarray:
        """(X, Y, Z) labels → (H, W, 3) uint8 image seen from ``camera``."""
        o3d, vis = self._o3d, self._vis
        cam = camera_preset(camera, grid) if isinstance(camera, str) else camera
        centers, _, colors = voxel_centers(sem, grid, hide=hide, classes=classes, palette=palette)
        vis.clear_geometries()
        if len(centers):
            drawn = _drawn_mask(sem, hide, classes)
            m = cube_mesh(centers, grid.voxel_size, colors, faces=exposed_faces(drawn))
            mesh = o3d.geometry.TriangleMesh(o3d.utility.Vector3dVector(m.vertices),
                                             o3d.utility.Vector3iVector(m.triangles.astype(np.int32)))
            mesh.vertex_colors = o3d.utility.Vector3dVector(m.colors / 255.0)
            vis.add_geometry(mesh, reset_bounding_box=True)
        if ego:
            corners, edges = ego_box()   # the nuScenes ego frame sits on the ground (z = 0)
            ls = o3d.geometry.LineSet(o3d.utility.Vector3dVector(corners), o3d.utility.Vector2iVector(edges))
            ls.paint_uniform_color([0.0, 0.0, 0.0])
            vis.add_geometry(ls, reset_bounding_box=not len(centers))
        self._set_camera(cam)
        vis.poll_events()
        vis.update_renderer()
        img = np.asarray(vis.capture_screen_float_buffer(do_render=True))
        return np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)

    def _set_camera(self, cam: CameraPreset) -> None:
        o3d = self._o3d
        ctr = self._vis.get_view_control()
        params = ctr.convert_to_pinhole_camera_parameters()
        w, h = self.width, self.height
        f = 0.5 * h / np.tan(np.radians(cam.fov_deg) / 2)
        params.intrinsic = o3d.camera.PinholeCameraIntrinsic(w, h, f, f, w / 2 - 0.5, h / 2 - 0.5)
        params.extrinsic = cam.extrinsic()
        ctr.convert_from_pinhole_camera_parameters(params, allow_arbitrary=True)
        ctr.set_constant_z_far(1e4)
        ctr.set_constant_z_near(0.1)

    def close(self) -> None:
        if self._vis is not None:
            self._vis.destroy_window()
            self._vis = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class BEVRenderer:
    """Fallback without Open3D: top-down image of the highest drawn voxel per (x, y) column in its exact
    palette colour (``height_shade`` darkens lower columns, at the price of colours that no longer match
    the legend); x (forward) points up, y (left) to the left, like the ``bev`` camera. Any other camera
    is drawn as BEV too. ``ego=True`` marks the car's body box (:data:`occ_mfd.ego.NUSCENES_EGO`) in black."""

    name = "bev-fallback"

    def __init__(self, width: int = 640, height: int = 480, height_shade: bool = False):
        self.width, self.height, self.height_shade = int(width), int(height), height_shade

    def render(self, sem: np.ndarray, grid: GridSpec, camera="bev", palette: np.ndarray = PALETTE,
               hide=(FREE_ID,), classes=None, ego: bool = True) -> np.ndarray:
        sem = np.asarray(sem)
        if tuple(sem.shape) != tuple(grid.shape):
            raise ValueError(f"BEVRenderer: label grid has shape {sem.shape}, grid expects {grid.shape}")
        keep = _drawn_mask(sem, hide, classes)
        Z = sem.shape[2]
        top = Z - 1 - np.argmax(keep[:, :, ::-1], axis=2)                                # (X, Y)
        any_ = keep.any(axis=2)
        lab = np.take_along_axis(sem, top[..., None], axis=2)[..., 0]
        shade = 0.6 + 0.4 * (top + 1) / Z if self.height_shade else np.ones(top.shape)   # top layer → 1.0
        rgb = np.asarray(palette, float)[lab] * shade[..., None]
        rgb[~any_] = BACKGROUND
        img = rgb[::-1, ::-1].astype(np.uint8)                   # rows: +x up; cols: +y left
        if ego:
            # The car's body box where it is (centred ``center_ahead`` ahead of the rear axle, the ego
            # origin), as the Open3D renderer's wire box: (x, y) in voxel units u = (x - lo) / voxel.
            img = img.copy()
            X, Y = sem.shape[:2]
            (x0, y0, _), (x1, y1, _) = NUSCENES_EGO.body.bounds()
            u = lambda v, axis: (v - grid.lo[axis]) / grid.voxel_size
            r0, r1 = round(X - u(x1, 0)), round(X - u(x0, 0))     # rows: +x up
            c0, c1 = round(Y - u(y1, 1)), round(Y - u(y0, 1))     # columns: +y left
            img[max(r0, 0):max(r1, 1), max(c0, 0):max(c1, 1)] = 0
        # nearest-neighbour upscale to fit (width, height), then pad with background
        s = max(1, min(self.height // img.shape[0], self.width // img.shape[1]))
        img = np.repeat(np.repeat(img, s, axis=0), s, axis=1)
        out = np.full((self.height, self.width, 3), BACKGROUND, dtype=np.uint8)
        h, w = min(img.shape[0], self.height), min(img.shape[1], self.width)
        r, c = (self.height - h) // 2, (self.width - w) // 2
        out[r:r + h, c:c + w] = img[:h, :w]
        return out

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def make_renderer(backend: str = "auto", width: int = 640, height: int = 480, notice=None):
    """``"open3d"``, ``"bev"`` (the fallback) or ``"auto"``: Open3D when it works, else the fallback with a
    one-line notice (passed to ``notice`` — a callable — or logged as a warning)."""
    if backend == "bev":
        return BEVRenderer(width, height)
    if backend not in ("auto", "open3d"):
        raise ValueError(f"unknown render backend {backend!r}: use 'auto', 'open3d' or 'bev'")
    try:
        return Open3DRenderer(width, height)
    except (RendererUnavailable, RuntimeError, ImportError) as e:
        if backend == "open3d":
            raise
        msg = f"notice: Open3D offscreen rendering unavailable ({e}); using the bird's-eye matplotlib-free fallback"
        if notice is None:
            log.warning(msg)
        else:
            notice(msg)
        return BEVRenderer(width, height)

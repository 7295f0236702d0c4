"""Viewer geometry (exact), headless renders (class colours where expected), forecast dumps, the CLI."""
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from occ_mfd.grid import FREE_ID, PALETTE, GridSpec
from occ_mfd.viz import geometry as geo
from occ_mfd.viz.backends import BEVRenderer, Open3DRenderer, RendererUnavailable
from occ_mfd.viz.forecast_io import ForecastRecord, load_forecast, save_forecast
from occ_mfd.viz.render import render_sequence, save_animation
from occ_mfd.viz.viewer import KEY_RIGHT, KEY_SPACE, ViewerState, key_callbacks

REPO = Path(__file__).resolve().parents[1]
SMALL = GridSpec((-20.0, -20.0, -1.0), (20.0, 20.0, 5.4), 0.8)     # 50 × 50 × 8


def test_voxel_centers_exact():
    g = GridSpec((0.0, 0.0, 0.0), (2.0, 1.2, 0.8), 0.4)              # 5 × 3 × 2
    sem = np.full(g.shape, FREE_ID, np.uint8)
    sem[0, 0, 0], sem[4, 2, 1], sem[2, 1, 0] = 4, 16, 11
    c, lab, col = geo.voxel_centers(sem, g)
    np.testing.assert_allclose(c, [[0.2, 0.2, 0.2], [1.0, 0.6, 0.2], [1.8, 1.0, 0.6]])
    np.testing.assert_array_equal(lab, [4, 11, 16])
    np.testing.assert_array_equal(col, PALETTE[[4, 11, 16]])
    c2, lab2, _ = geo.voxel_centers(sem, g, classes=[16])
    np.testing.assert_allclose(c2, [[1.8, 1.0, 0.6]])
    with pytest.raises(ValueError, match="shape"):
        geo.voxel_centers(sem[:4], g)


def test_cube_mesh_vertices_normals_and_colours():
    m = geo.cube_mesh(np.array([[1.0, 2.0, 3.0]]), 2.0, np.array([[100, 50, 200]], np.uint8))
    assert m.vertices.shape == (24, 3) and m.triangles.shape == (12, 3)
    corners = {tuple(v) for v in m.vertices}
    assert corners == {(1 + sx, 2 + sy, 3 + sz) for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)}
    v = m.vertices[m.triangles]                                          # (12, 3, 3)
    normal = np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0])
    outward = v.mean(1) - np.array([1.0, 2.0, 3.0])
    assert np.all(np.einsum("ij,ij->i", normal, outward) > 0)           # all faces wound outward
    top = m.vertices[:, 2] == 4.0
    top_face = np.flatnonzero(top.reshape(6, 4).all(1))[0]
    np.testing.assert_array_equal(m.colors[4 * top_face:4 * top_face + 4], [[100, 50, 200]] * 4)
    np.testing.assert_array_equal(m.colors[0], np.round(np.array([100, 50, 200]) * geo.FACE_SHADE[0]))


def test_exposed_faces_hides_shared_faces():
    keep = np.zeros((3, 1, 1), bool)
    keep[0] = keep[1] = True
    f = geo.exposed_faces(keep)                                          # order -x +x -y +y -z +z
    np.testing.assert_array_equal(f, [[1, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]])
    m = geo.cube_mesh(np.zeros((2, 3)), 1.0, faces=f)
    assert m.vertices.shape == (40, 3) and m.triangles.shape == (20, 3)


def test_error_labels_and_legend():
    gt = np.array([4, 4, 17, 16, 17])
    pred = np.array([4, 17, 4, 11, 17])
    codes, tp, fp, fn = geo.error_labels(pred, gt)
    np.testing.assert_array_equal(codes, [geo.ERR_TP, geo.ERR_FN, geo.ERR_FP, geo.ERR_WRONG, geo.ERR_FREE])
    np.testing.assert_array_equal(tp, [1, 0, 0, 1, 0])
    np.testing.assert_array_equal(fp, [0, 0, 1, 0, 0])
    np.testing.assert_array_equal(fn, [0, 1, 0, 0, 0])
    assert not np.array_equal(geo.ERROR_PALETTE[geo.ERR_FP], geo.ERROR_PALETTE[geo.ERR_FN])
    assert [e[:2] for e in geo.legend_entries(gt, pred)] == [(4, "car"), (11, "driveable_surface"),
                                                              (16, "vegetation")]


def test_ego_box_and_cameras():
    corners, edges = geo.ego_box()                                       # body box, 1.3 m ahead of the rear axle
    np.testing.assert_allclose(corners.min(0), [1.3 - 2.04, -0.865, 0.0], atol=1e-12)
    np.testing.assert_allclose(corners.max(0), [1.3 + 2.04, 0.865, 1.56], atol=1e-12)
    lengths = sorted(np.round(np.linalg.norm(corners[edges[:, 0]] - corners[edges[:, 1]], axis=1), 6))
    assert lengths == sorted([1.56] * 4 + [1.73] * 4 + [4.08] * 4)
    E = geo.camera_preset("bev", SMALL).extrinsic()
    cam = lambda p: (E @ np.append(p, 1.0))[:3]                           # OpenCV: x right, y down
    assert cam([10.0, 0, 0])[1] < 0 and cam([0, 10.0, 0])[0] < 0          # forward = up, left = left
    chase = geo.camera_preset("chase", SMALL)
    assert chase.eye[0] < 0 < chase.eye[2]
    with pytest.raises(ValueError, match="unknown camera"):
        geo.camera_preset("side", SMALL)


def _three_blocks():
    """car in front (x > 4 m), vegetation behind (x < -4 m), bus on the left in between (y > 4 m)."""
    sem = np.full(SMALL.shape, FREE_ID, np.uint8)
    c = SMALL.centers()
    x, y = c[..., 0], c[..., 1]
    sem[(x > 4) & (c[..., 2] < 1)] = 4
    sem[(x < -4) & (c[..., 2] < 1)] = 16
    sem[(np.abs(x) < 3) & (y > 4) & (c[..., 2] < 1)] = 3
    return sem


def _nearest_class(pixels):
    d = np.linalg.norm(pixels[:, None, :].astype(float) - PALETTE[None].astype(float), axis=2)
    return np.bincount(d.argmin(1), minlength=len(PALETTE)).argmax()


def _check_regions(img):
    H, W = img.shape[:2]
    patch = lambda r, c: img[int(r * H) - 3:int(r * H) + 3, int(c * W) - 3:int(c * W) + 3].reshape(-1, 3)
    assert _nearest_class(patch(0.2, 0.5)) == 4          # top: car (ahead)
    assert _nearest_class(patch(0.8, 0.5)) == 16         # bottom: vegetation (behind)
    assert _nearest_class(patch(0.5, 0.5 - 0.3 * H / W)) == 3   # left: bus
    assert _nearest_class(patch(0.5, 0.5 + 0.3 * H / W)) == FREE_ID   # right: background (white)


def test_bev_fallback_render_colours_in_place():
    img = BEVRenderer(300, 300).render(_three_blocks(), SMALL, "bev")
    _check_regions(img)


def test_bev_fallback_ego_rectangle_is_the_body_box():
    """The black ego marker covers the body box, 1.3 m ahead of the rear axle: x ∈ [-0.74, 3.34] m,
    |y| ≤ 0.865 m (to the voxel), on a 2 cm grid whose voxel edges fall on the x bounds."""
    g = GridSpec((-8.0, -8.0, -1.0), (8.0, 8.0, -0.96), 0.02)         # 800 × 800 × 2
    X, Y, _ = g.shape
    img = BEVRenderer(Y, X).render(np.full(g.shape, FREE_ID, np.uint8), g, "bev")   # one pixel per voxel
    assert img.shape == (X, Y, 3)
    rows, cols = np.nonzero((img == 0).all(axis=2))
    assert len(rows) == (np.ptp(rows) + 1) * (np.ptp(cols) + 1)        # one filled rectangle
    # row r shows voxel X-1-r (x up), column c voxel Y-1-c (y left); voxel i spans lo + [i, i+1] * 0.02 m
    x_lo, x_hi = g.lo[0] + (X - 1 - rows.max()) * 0.02, g.lo[0] + (X - rows.min()) * 0.02
    y_lo, y_hi = g.lo[1] + (Y - 1 - cols.max()) * 0.02, g.lo[1] + (Y - cols.min()) * 0.02
    assert x_lo == pytest.approx(-0.74, abs=1e-9) and x_hi == pytest.approx(3.34, abs=1e-9)
    assert abs(y_lo + 0.865) <= 0.01 and abs(y_hi - 0.865) <= 0.01


def test_open3d_offscreen_render_colours_in_place():
    try:
        r = Open3DRenderer(240, 240)
    except RendererUnavailable as e:
        pytest.skip(f"offscreen Open3D unavailable: {e}")
    with r:
        img = r.render(_three_blocks(), SMALL, "bev")
    _check_regions(img)


def _record(P=2, F=2, pred=True):
    g = np.random.default_rng(0)
    sem = np.where(g.random((P + F, *SMALL.shape)) < 0.05, 4, FREE_ID).astype(np.uint8)
    ego = np.tile(np.eye(4, dtype=np.float32), (P + F, 1, 1))
    return ForecastRecord(sem[:P], sem[P:], sem[P:][:, ::-1].copy() if pred else None, ego, SMALL,
                          "copy-last", "scene-x", [f"tok{i}" for i in range(P + F)])


def test_forecast_round_trip_and_errors(tmp_path):
    r = _record()
    p = save_forecast(tmp_path / "a.npz", r.past, r.future_gt, r.pred, r.ego, r.grid, r.name, r.scene, r.tokens)
    back = load_forecast(p)
    for k in ("past", "future_gt", "pred", "ego"):
        np.testing.assert_array_equal(getattr(back, k), getattr(r, k))
    assert (back.grid, back.name, back.scene, back.tokens) == (SMALL, "copy-last", "scene-x", r.tokens)
    assert [f.name for f in tmp_path.iterdir()] == ["a.npz"]            # no temp file left
    with pytest.raises(ValueError, match="'pred'"):
        save_forecast(tmp_path / "b.npz", r.past, r.future_gt, r.pred[:1], r.ego, r.grid)
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        load_forecast(tmp_path / "nope.npz")
    np.savez(tmp_path / "c.npz", past=r.past)
    with pytest.raises(ValueError, match=r"c\.npz: missing key"):
        load_forecast(tmp_path / "c.npz")


def test_render_sequence_and_animation_files(tmp_path):
    import imageio.v2 as iio
    r = _record()
    frames = render_sequence(r, BEVRenderer(160, 120), progress=False)
    assert len(frames) == 4 and len({f.shape for f in frames}) == 1
    save_animation(frames, tmp_path / "s.gif")
    assert len(iio.mimread(tmp_path / "s.gif")) == 4
    save_animation(frames, tmp_path / "s.png")
    assert iio.imread(tmp_path / "s.png").shape[0] == 4 * frames[0].shape[0]     # vertical strip
    with pytest.raises(ValueError, match="unsupported"):
        save_animation(frames, tmp_path / "s.avi")
    try:
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match=r"imageio-ffmpeg.*\.gif"):
            save_animation(frames, tmp_path / "s.mp4")


def test_render_sequence_pixels_match_pyplot(monkeypatch):
    """The standalone Figure on an Agg canvas (no pyplot) gives the same pixels as a pyplot figure."""
    import matplotlib.pyplot as plt
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from occ_mfd.viz import render
    r = _record()
    frames = render_sequence(r, BEVRenderer(160, 120), progress=False)
    made = []

    def pyplot_figure(figsize, dpi):
        made.append(plt.figure(figsize=figsize, dpi=dpi))
        assert isinstance(made[-1].canvas, FigureCanvasAgg)      # Agg, or a GUI canvas drawing with Agg
        return made[-1]

    monkeypatch.setattr(render, "_figure", pyplot_figure)
    try:
        ref = render_sequence(r, BEVRenderer(160, 120), progress=False)
    finally:
        for f in made:
            plt.close(f)
    assert len(made) == len(ref) == len(frames) == 4
    for a, b in zip(frames, ref):
        np.testing.assert_array_equal(a, b)
    assert len({f.tobytes() for f in frames}) > 1                 # the frames differ (time labels, panels)


def test_viewer_state():
    st = ViewerState(_record(P=2, F=2))
    assert st.classes_present == [4]
    st.step(-1)
    assert st.t == 3
    assert st.set_view(3) is None                         # the prediction has t = 3: no jump
    assert st.view == "pred" and st.current() is not None
    st.step(1)                                            # wraps within the prediction's times: t = 2, not 0
    assert st.t == 2 and st.status() == "pred t=+0.5s"
    st.cycle_class()
    assert st.class_filter == 4
    st.cycle_class()
    assert st.class_filter is None
    st.toggle_camera()
    assert st.camera == "bev"


@pytest.mark.parametrize("P,F", [(1, 1), (2, 2), (4, 6)])
def test_viewer_view_times_match_panels(P, F):
    """times(view) is exactly where panel_grids has something, with and without a prediction."""
    from occ_mfd.viz.render import VIEWS, panel_grids
    for pred in (True, False):
        st = ViewerState(_record(P=P, F=F, pred=pred))
        for v in VIEWS:
            want = [t for t in range(P + F) if panel_grids(st.rec, t, (v,))[v] is not None]
            assert st.times(v) == want
        assert st.times("gt") == list(range(P, P + F)) and st.times("past") == list(range(P + F))
    with pytest.raises(ValueError, match="unknown view"):
        st.times("side")


def test_viewer_switching_to_an_empty_view_jumps_to_its_nearest_time():
    """The bug seen under Xvfb: 2 (GT future) at a history frame showed an empty scene. Now every switch
    lands on a time the view has: the first future frame t = P from any history frame, the same t in the
    future; stepping then wraps within the future (closed form: P + (t - P + d) mod F)."""
    P, F = 4, 3
    for t0 in range(P + F):
        for k, view in ((2, "gt"), (3, "pred"), (4, "error")):
            st = ViewerState(_record(P=P, F=F))
            st.t = t0
            note = st.set_view(k)
            assert st.view == view and st.t == max(t0, P) and st.current() is not None
            if t0 < P:
                assert note == f"{view}: nothing at t={(t0 - P + 1) * 0.5:+.1f}s (history); jumped to t=+0.5s"
            else:
                assert note is None
            for d in (1, -1, 2, F + 1):
                st.t = P + 1
                st.step(d)
                assert st.t == P + (1 + d) % F
            assert st.set_view(1) is None and st.view == "past"          # the past has every time: no jump
            st.step(F + P)                                                  # a whole turn: back where it was
            assert st.t == P + (1 + F + 1) % F


def test_viewer_without_prediction_keeps_the_view():
    st = ViewerState(_record(P=2, F=2, pred=False))
    st.set_view(2)
    assert (st.view, st.t) == ("gt", 2)
    for k, v in ((3, "pred"), (4, "error")):
        note = st.set_view(k)
        assert note == f"{v}: nothing to show, this record has no prediction (ground truth only); still on gt"
        assert (st.view, st.t) == ("gt", 2)


def test_viewer_titles_say_view_time_filter_and_camera():
    st = ViewerState(_record(P=2, F=2))
    src = "scene-x (copy-last)"
    assert st.window_title() == f"past t=-0.5s | chase camera | {src} | occ-mfd viewer"
    st.t = 3                                              # the past view in the future: the last observed frame
    assert st.status() == "past t=+0.0s (last observed; now +1.0s)"
    st.set_view(2)
    st.cycle_class()
    st.toggle_camera()
    st.playing = True
    assert st.window_title() == f"gt t=+1.0s [car] | playing | bev camera | {src} | occ-mfd viewer"
    st.set_view(4)                                        # the error view has its own palette: no class filter
    assert st.status() == "error t=+1.0s"
    bare = ViewerState(ForecastRecord(st.rec.past, st.rec.future_gt, None, st.rec.ego, SMALL))
    assert bare.window_title() == "past t=-0.5s | chase camera | occ-mfd viewer"


def test_display_problem_one_line():
    from occ_mfd.viz.x11 import display_problem
    assert display_problem({}, "darwin") is None and display_problem({"WAYLAND_DISPLAY": "w"}, "linux") is None
    msg = display_problem({}, "linux")
    assert msg.startswith("no display") and "\n" not in msg
    assert all(h in msg for h in ("--render out.gif", "xvfb-run -a", "ssh -X"))
    msg = display_problem({"DISPLAY": ":99999"}, "linux")
    if msg is not None:                                   # None only where libX11 cannot be loaded
        assert msg.startswith("cannot open the X display DISPLAY=:99999: ")


def test_viewer_key_callbacks_log_messages(caplog, tmp_path):
    """The window's key callbacks, without a window: state, drawing hooks and the logged lines."""
    st = ViewerState(_record(P=2, F=2))
    drawn, shots = [], []
    keys = key_callbacks(st, drawn.append, shots.append, tmp_path)
    with caplog.at_level(logging.INFO, logger="occ_mfd.viz.viewer"):
        assert keys[KEY_RIGHT](None) is True              # t = 1: the current frame
        keys[ord("3")](None)                              # prediction: none during the history → first future frame
        keys[KEY_RIGHT](None)                             # t = 3: the last future frame
        keys[ord("C")](None)                              # class filter: car
        assert keys[KEY_SPACE](None) is False and st.playing
        keys[KEY_SPACE](None)
        keys[ord("S")](None)
        keys[ord("B")](None)                              # camera change: redraw resets the camera
        keys[ord("H")](None)
    msgs = [r.getMessage() for r in caplog.records if r.name == "occ_mfd.viz.viewer"]
    shot = tmp_path / "occ_view_000.png"
    assert msgs[:9] == ["past t=+0.0s", "pred: nothing at t=+0.0s (history); jumped to t=+0.5s", "pred t=+0.5s",
                        "pred t=+1.0s", "pred t=+1.0s [car]", "playing", "paused", f"saved {shot}",
                        "pred t=+1.0s [car]"]
    assert len(msgs) == 10 and msgs[9].startswith("Keys:") and "\nclasses: car=(" in msgs[9]
    assert "\nerror view: correct=(" in msgs[9]
    assert drawn == [False, False, False, False, True] and shots == [shot] and st.camera == "bev"


def _cli(*args):
    return subprocess.run([sys.executable, str(REPO / "visualize/view.py"), *args], capture_output=True,
                          text=True, timeout=120)


def test_cli_missing_paths(tmp_path):
    for flag in ("--forecast", "--data"):
        missing = tmp_path / f"missing{flag[2:]}.npz"
        out = _cli(flag, str(missing), "--render", str(tmp_path / "o.png"))
        assert out.returncode != 0 and str(missing) in out.stderr
    assert not (tmp_path / "o.png").exists()


def test_cli_headless_gif(tmp_path):
    import imageio.v2 as iio
    r = _record(P=1, F=1)
    p = save_forecast(tmp_path / "f.npz", r.past, r.future_gt, r.pred, r.ego, r.grid, r.name)
    out = _cli("--forecast", str(p), "--render", str(tmp_path / "o.gif"), "--backend", "bev", "--size", "120x90")
    assert out.returncode == 0, out.stderr
    assert len(iio.mimread(tmp_path / "o.gif")) == 2


def test_cli_prepared_sequence_by_scene_and_token(tmp_path):
    """--data on a tiny prepared dataset: the window whose current frame is --token is rendered."""
    import imageio.v2 as iio
    from occ_mfd.data.index import DatasetIndex, FrameEntry, SceneEntry, save_index
    from occ_mfd.data.occ3d import OccFrame, labels_path, write_labels

    frames = []
    for i in range(3):
        sem = np.full(SMALL.shape, FREE_ID, np.uint8)
        sem[10 + i, 10, 0] = 4
        ones = np.ones(SMALL.shape, np.uint8)
        write_labels(labels_path(tmp_path, "scene-a", f"tok{i}"), OccFrame(sem, ones, ones), SMALL)
        frames.append(FrameEntry(f"tok{i}", 1_000_000 + 500_000 * i, np.eye(4)))
    save_index(tmp_path, DatasetIndex(SMALL, [SceneEntry("scene-a", "val", frames)]))
    common = ("--data", str(tmp_path), "--past", "1", "--future", "1", "--backend", "bev", "--size", "100x100")
    out = _cli(*common, "--scene", "scene-a", "--token", "tok1", "--render", str(tmp_path / "o.gif"))
    assert out.returncode == 0, out.stderr
    assert len(iio.mimread(tmp_path / "o.gif")) == 2
    out = _cli(*common, "--token", "no-such-token", "--render", str(tmp_path / "p.gif"))
    assert out.returncode != 0 and "no-such-token" in out.stderr

"""The interactive viewer (visualize/view.py) driven through a real X display: Xvfb, keys sent with xdotool,
screenshots taken with ImageMagick's ``import``; the window title read back with ``xdotool getwindowname``.

Skips where Xvfb, xdotool, ImageMagick or Open3D are missing (``scripts/setup_env.sh`` installs the Debian
packages when run as root). The display-less error path needs none of them.
"""
from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from occ_mfd.grid import FREE_ID, PALETTE, GridSpec
from occ_mfd.viz.forecast_io import save_forecast
from occ_mfd.viz.geometry import ERR_FN, ERR_FP, ERROR_PALETTE, FACE_SHADE

REPO = Path(__file__).resolve().parents[1]
VIEW = REPO / "visualize" / "view.py"
SMALL = GridSpec((-20.0, -20.0, -1.0), (20.0, 20.0, 5.4), 0.8)     # 50 × 50 × 8
SIZE = (480, 360)                                                    # the viewer window
CAR, BUS, ROAD, VEG = 4, 3, 11, 16
TIMEOUT_S = 20                                                       # per wait; a passing run waits < 1 s


def _missing_tools():
    missing = [name for t, name in (("Xvfb", "Xvfb"), ("xdotool", "xdotool"), ("import", "ImageMagick's import"))
               if shutil.which(t) is None]
    try:
        import open3d  # noqa: F401
    except ImportError:
        missing.append("open3d")
    return missing


# ---------------------------------------------------------------- the sequence shown
def _box(sem, cls, x, y, z=(-0.2, 1.4)):
    """Fill the voxels whose centres lie in the box x × y × z (metres) with ``cls``."""
    c = SMALL.centers()
    inside = np.ones(SMALL.shape, bool)
    for k, (lo, hi) in enumerate((x, y, z)):
        inside &= (c[..., k] > lo) & (c[..., k] < hi)
    sem[inside] = cls
    return sem


def _frames():
    """P = 2 past and F = 2 future frames: road everywhere and blocks ahead of the ego car (what the chase
    camera sees): the car moves from the right to the left over the history; the future has vegetation ahead
    and the car moving on; the prediction puts a bus where the car was."""
    empty = lambda: _box(np.full(SMALL.shape, FREE_ID, np.uint8), ROAD, (-20, 20), (-20, 20), (-1, -0.2))
    past = [_box(empty(), CAR, (5, 9), (-7, -3)), _box(empty(), CAR, (5, 9), (3, 7))]
    fut = [_box(_box(empty(), VEG, (10, 14), (-2, 2)), CAR, (5, 9), (3, 7)),
           _box(_box(empty(), VEG, (10, 14), (-2, 2)), CAR, (7, 11), (4, 8))]
    pred = [_box(empty(), BUS, (5, 9), (-7, -3)), _box(empty(), BUS, (5, 9), (-7, -3))]
    return np.stack(past), np.stack(fut), np.stack(pred)


def _write_prepared(root: Path, frames: np.ndarray) -> None:
    """A prepared dataset (index.json + gts/) with one val scene "scene-a" of these frames."""
    from occ_mfd.data.index import DatasetIndex, FrameEntry, SceneEntry, save_index
    from occ_mfd.data.occ3d import OccFrame, labels_path, write_labels

    entries = []
    for i, sem in enumerate(frames):
        ones = np.ones(SMALL.shape, np.uint8)
        write_labels(labels_path(root, "scene-a", f"tok{i}"), OccFrame(sem, ones, ones), SMALL)
        entries.append(FrameEntry(f"tok{i}", 1_000_000 + 500_000 * i, np.eye(4)))
    save_index(root, DatasetIndex(SMALL, [SceneEntry("scene-a", "val", entries)]))


# ---------------------------------------------------------------- pixels
def _shades(rgb):
    """Every colour a face of a cube of colour ``rgb`` is drawn with (unlit: palette × face shade)."""
    return np.unique(np.round(np.asarray(rgb, float)[None] * np.append(FACE_SHADE, 1.0)[:, None]), axis=0)


def _count(img, rgb, tol=3):
    """Pixels of ``img`` drawn in ``rgb`` (any face shade)."""
    d = np.abs(img[:, :, None, :].astype(int) - _shades(rgb)[None, None].astype(int)).max(-1)
    return int((d <= tol).any(-1).sum())


def _counts(img):
    return {"car": _count(img, PALETTE[CAR]), "bus": _count(img, PALETTE[BUS]), "veg": _count(img, PALETTE[VEG]),
            "fp": _count(img, ERROR_PALETTE[ERR_FP]), "fn": _count(img, ERROR_PALETTE[ERR_FN])}


# ---------------------------------------------------------------- the X session
@contextmanager
def _xvfb(*extra: str):
    """A private Xvfb display ":N" (the server picks a free N) for the block; skips where it cannot start."""
    r, w = os.pipe()
    err = tempfile.TemporaryFile()
    proc = subprocess.Popen(["Xvfb", "-displayfd", str(w), "-screen", "0", "640x480x24", "-nolisten", "tcp",
                             *extra], pass_fds=(w,), stdout=subprocess.DEVNULL, stderr=err)
    os.close(w)
    try:
        num = b""
        deadline = time.monotonic() + TIMEOUT_S
        while not num.endswith(b"\n") and time.monotonic() < deadline and proc.poll() is None:
            if select.select([r], [], [], 0.5)[0]:
                chunk = os.read(r, 16)
                if not chunk:
                    break
                num += chunk
        if not num.strip().isdigit():
            proc.kill()
            proc.wait(timeout=10)
            err.seek(0)
            pytest.skip(f"Xvfb did not start: {err.read().decode(errors='replace')[-500:]}")
        yield f":{num.strip().decode()}"
    finally:
        os.close(r)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        err.close()


@pytest.fixture(scope="module")
def xvfb():
    """One Xvfb display for the module's window tests; they skip without Xvfb, xdotool, import or Open3D."""
    missing = _missing_tools()
    if missing:
        pytest.skip(f"interactive-viewer test needs {', '.join(missing)} (apt-get install xvfb xdotool "
                    "imagemagick; pip install open3d-cpu)")
    with _xvfb() as display:
        yield display


class Viewer:
    """visualize/view.py in a window on ``display``, driven like a user: keys, title, screenshots."""

    def __init__(self, display: str, cwd: Path, *args: str):
        self.display, self.cwd = display, cwd
        self.env = {**os.environ, "DISPLAY": display, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.log_path = cwd / "viewer.log"
        self.shots = 0
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, str(VIEW), *args, "--size", f"{SIZE[0]}x{SIZE[1]}"],
                                         cwd=cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        try:
            self.window = self._find_window()
            geo = dict(line.split("=") for line in self.xdo("getwindowgeometry", "--shell", self.window).split())
            self.box = (int(geo["X"]), int(geo["Y"]), int(geo["WIDTH"]), int(geo["HEIGHT"]))
            self.xdo("windowfocus", "--sync", self.window)       # no window manager: keys go to the focus
        except BaseException:
            self.close()
            raise

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _fail(self, what: str):
        pytest.fail(f"{what}; viewer exit code {self.proc.poll()}, its output:\n{self.log()[-3000:]}")

    def xdo(self, *args: str, timeout: float = TIMEOUT_S) -> str:
        out = subprocess.run(["xdotool", *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            self._fail(f"xdotool {' '.join(args)} failed: {out.stderr.strip()}")
        return out.stdout.strip()

    def _find_window(self) -> str:
        deadline = time.monotonic() + 60                 # Open3D's import and first frame: ~2 s here
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._fail("the viewer exited before its window appeared")
            try:
                out = subprocess.run(["xdotool", "search", "--sync", "--onlyvisible", "--name", "occ-mfd viewer"],
                                     env=self.env, capture_output=True, text=True, timeout=2)
            except subprocess.TimeoutExpired:
                continue
            if out.returncode == 0 and out.stdout.split():
                return out.stdout.split()[0]
        self._fail("no viewer window within 60 s")

    def title(self) -> str:
        return self.xdo("getwindowname", self.window)

    def key(self, name: str, title: str | None = None) -> None:
        """Press ``name`` (an X keysym) in the window; with ``title``, wait until the window says so."""
        if self.proc.poll() is not None:
            self._fail(f"the viewer exited before key {name}")
        self.xdo("key", name)
        if title is not None:
            self.wait_title(lambda t: t == title, f"title {title!r} after key {name}")

    def wait_log(self, text: str, count: int = 1) -> None:
        """Wait until the viewer's output holds ``text`` ``count`` times."""
        deadline = time.monotonic() + TIMEOUT_S
        while self.log().count(text) < count:
            if time.monotonic() > deadline:
                self._fail(f"{text!r} not printed {count} time(s) within {TIMEOUT_S} s")
            time.sleep(0.05)

    def wait_title(self, ok, what: str) -> str:
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            t = self.title()
            if ok(t):
                return t
            if time.monotonic() > deadline:
                self._fail(f"no {what} within {TIMEOUT_S} s (title now {t!r})")
            time.sleep(0.05)

    def screenshot(self) -> np.ndarray:
        """The window's pixels (H, W, 3) as the X server has them now."""
        import imageio.v2 as iio

        path = self.cwd / f"screen_{self.shots:02d}.png"
        self.shots += 1
        for attempt in range(3):
            out = subprocess.run(["import", "-window", "root", f"png24:{path}"], env=self.env,
                                 capture_output=True, text=True, timeout=TIMEOUT_S)
            if out.returncode == 0 and path.exists():
                break
            time.sleep(0.2 * (attempt + 1))
        else:
            self._fail(f"import -window root failed: {out.stderr.strip()}")
        x, y, w, h = self.box
        img = np.asarray(iio.imread(path))
        img = np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img[..., :3]   # (png24: RGB anyway)
        return img[y:y + h, x:x + w]

    def screen_until(self, ok, what: str) -> np.ndarray:
        """Screenshots until ``ok(img)`` (the title changes in the key callback, the frame a moment later)."""
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            img = self.screenshot()
            if ok(img):
                return img
            if time.monotonic() > deadline:
                self._fail(f"screen never showed {what} within {TIMEOUT_S} s (last: {_counts(img)})")
            time.sleep(0.1)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)


def _title(status: str, source: str, camera: str = "chase", playing: bool = False) -> str:
    return " | ".join([status] + (["playing"] if playing else []) + [f"{camera} camera", source, "occ-mfd viewer"])


def test_viewer_keys_on_x_display(xvfb, tmp_path):
    """Every key of the viewer through the window system, on a forecast dump with a prediction: the title
    says what is shown, the pixels show it (class colours counted in the screenshots), S writes a file."""
    past, fut, pred = _frames()
    ego = np.tile(np.eye(4, dtype=np.float32), (4, 1, 1))
    dump = save_forecast(tmp_path / "seq.npz", past, fut, pred, ego, SMALL, "copy-left", "scene-a")
    src = "scene-a (copy-left)"
    v = Viewer(xvfb, tmp_path, "--forecast", str(dump))
    try:
        v.wait_title(lambda t: t == _title("past t=-0.5s", src), "the first title")
        first = v.screen_until(lambda im: _counts(im)["car"] > 200, "the car of the first frame")
        assert _counts(first)["veg"] == _counts(first)["bus"] == 0

        v.key("Right", _title("past t=+0.0s", src))                       # → the next frame: pixels differ
        cur = v.screen_until(lambda im: not np.array_equal(im, first), "the next frame")
        assert _counts(cur)["car"] > 200

        # 2 at a history frame: the ground truth has nothing then, so it jumps to the first future frame
        v.key("2", _title("gt t=+0.5s", src))
        gt = v.screen_until(lambda im: _counts(im)["veg"] > 200, "the ground-truth vegetation")
        assert _counts(gt)["car"] > 200 and _counts(gt)["bus"] == 0
        v.key("3", _title("pred t=+0.5s", src))
        pr = v.screen_until(lambda im: _counts(im)["bus"] > 200, "the predicted bus")
        assert _counts(pr)["car"] == _counts(pr)["veg"] == 0
        v.key("4", _title("error t=+0.5s", src))                          # bus: false positive; car, veg: missed
        er = v.screen_until(lambda im: min(_counts(im)["fp"], _counts(im)["fn"]) > 200, "false positives/negatives")
        assert _counts(er)["bus"] == _counts(er)["veg"] == 0
        v.key("1", _title("past t=+0.0s (last observed; now +0.5s)", src))   # the current frame again, as before
        v.screen_until(lambda im: np.array_equal(im, cur), "the same pixels as the current frame before")

        v.key("2", _title("gt t=+0.5s", src))
        v.screen_until(lambda im: np.array_equal(im, gt), "the same pixels as the ground truth before")
        v.key("c", _title("gt t=+0.5s [bus]", src))                       # classes present: bus, car, road, veg
        v.screen_until(lambda im: sum(_counts(im).values()) == 0, "no class colour (no bus in the ground truth)")
        v.key("c", _title("gt t=+0.5s [car]", src))
        v.screen_until(lambda im: _counts(im)["car"] > 200 and _counts(im)["veg"] == 0, "the car alone")
        v.key("c", _title("gt t=+0.5s [driveable_surface]", src))
        v.key("c", _title("gt t=+0.5s [vegetation]", src))
        v.key("c", _title("gt t=+0.5s", src))
        v.screen_until(lambda im: np.array_equal(im, gt), "all classes again")

        v.key("b", _title("gt t=+0.5s", src, camera="bev"))               # bird's-eye: other pixels, same classes
        bev = v.screen_until(lambda im: not np.array_equal(im, gt) and _counts(im)["veg"] > 200, "the bird's-eye view")
        v.key("Right", _title("gt t=+1.0s", src, camera="bev"))
        v.screen_until(lambda im: not np.array_equal(im, bev), "the last future frame")
        v.key("Right", _title("gt t=+0.5s", src, camera="bev"))           # wraps within the future: GT has no history
        v.screen_until(lambda im: np.array_equal(im, bev), "the first future frame again")

        import imageio.v2 as iio
        v.key("s")                                                        # S: the window's pixels to a PNG file
        v.wait_log("saved occ_view_000.png")
        saved = np.asarray(iio.imread(tmp_path / "occ_view_000.png"))[..., :3]
        assert saved.shape == (SIZE[1], SIZE[0], 3) and _counts(saved)["veg"] > 200

        v.key("h")
        v.wait_log("Keys: ", count=2)                                     # the help: at start, and on H
        assert "classes: bus=(255, 255, 0), car=(0, 150, 245)" in v.log()

        v.key("space")                                                    # plays: time moves on its own (0.5 s)
        played = v.wait_title(lambda t: "| playing |" in t, "playing")
        assert played in [_title(f"gt t={s}", src, camera="bev", playing=True) for s in ("+0.5s", "+1.0s")]
        v.wait_title(lambda t: "| playing |" in t and t != played, "the next played frame")
        v.key("space")
        paused = v.wait_title(lambda t: "playing" not in t, "paused")
        time.sleep(1.2)                                                    # > 2 play intervals: nothing moves
        assert v.title() == paused and v.proc.poll() is None
    finally:
        v.close()
    log = v.log()
    assert "gt: nothing at t=+0.0s (history); jumped to t=+0.5s" in log
    assert "Traceback" not in log


def test_viewer_prepared_dataset_without_prediction(xvfb, tmp_path):
    """The user's first look: --data on a prepared sequence (ground truth only). 2 at the first history frame
    jumps to the first future frame (it showed an empty scene before); 3/4 have nothing and say so."""
    past, fut, _ = _frames()
    _write_prepared(tmp_path / "data", np.concatenate([past, fut]))
    src = "scene-a (ground truth)"
    v = Viewer(xvfb, tmp_path, "--data", str(tmp_path / "data"), "--past", "2", "--future", "2")
    try:
        v.wait_title(lambda t: t == _title("past t=-0.5s", src), "the first title")
        v.key("2", _title("gt t=+0.5s", src))
        v.screen_until(lambda im: _counts(im)["veg"] > 200, "the ground-truth vegetation")
        v.key("3")
        v.wait_log("pred: nothing to show")
        assert v.title() == _title("gt t=+0.5s", src)
    finally:
        v.close()
    assert "pred: nothing to show, this record has no prediction (ground truth only); still on gt" in v.log()
    assert "gt: nothing at t=-0.5s (history); jumped to t=+0.5s" in v.log()


@pytest.mark.parametrize("display", [":99999", None])
def test_viewer_without_display_says_what_to_do(tmp_path, display):
    """No display to open: one line on stderr naming the ways out (--render, xvfb-run, ssh -X), exit 2, fast
    (before Open3D, which would otherwise fall back to an invisible offscreen window and wait forever)."""
    past, fut, pred = _frames()
    dump = save_forecast(tmp_path / "seq.npz", past, fut, pred, np.tile(np.eye(4, dtype=np.float32), (4, 1, 1)),
                         SMALL)
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    if display:
        env["DISPLAY"] = display
    out = subprocess.run([sys.executable, str(VIEW), "--forecast", str(dump)], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    for hint in ("--render out.gif", "xvfb-run -a python visualize/view.py", "ssh -X"):
        assert hint in lines[0]
    assert (f"cannot open the X display DISPLAY={display}" if display else "DISPLAY is not set") in lines[0]


def test_viewer_on_a_display_without_opengl(tmp_path):
    """A display that opens but has no OpenGL (an Xvfb without GLX; e.g. ssh -X to an X server refusing
    indirect GLX): Open3D's own lines, then one line of ours saying what to do, exit 2, no traceback."""
    if shutil.which("Xvfb") is None or "open3d" in _missing_tools():
        pytest.skip("needs Xvfb and Open3D")
    past, fut, pred = _frames()
    dump = save_forecast(tmp_path / "seq.npz", past, fut, pred, np.tile(np.eye(4, dtype=np.float32), (4, 1, 1)),
                         SMALL)
    with _xvfb("-extension", "GLX") as display:
        out = subprocess.run([sys.executable, str(VIEW), "--forecast", str(dump), "--size", "320x240"],
                             env={**os.environ, "DISPLAY": display, "OMP_NUM_THREADS": "1"}, capture_output=True,
                             text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    ours = [ln for ln in out.stderr.splitlines() if ln.startswith("error: ") and "XDG_RUNTIME_DIR" not in ln]
    assert ours == [f"error: could not open an OpenGL window on DISPLAY={display} (Open3D's lines above say why; "
                    "over ssh -X the local X server must allow indirect GLX): render headless instead (--render "
                    "out.gif, then copy the file) or run under a virtual display (xvfb-run -a python "
                    "visualize/view.py ...)"], out.stderr

"""The little the interactive viewer needs from the X window system, through Xlib (ctypes, no extra package):
whether a display can be opened at all (:func:`display_problem`, asked before Open3D tries), and the title of
the viewer's own window (:class:`WindowTitle`; Open3D's legacy window has no way to change it).

Everything here degrades to "cannot tell": off Linux, without ``libX11``, or under Wayland without XWayland
:func:`display_problem` returns None and :meth:`WindowTitle.find` returns None.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from contextlib import contextmanager
from functools import lru_cache

NO_WINDOW_ADVICE = ("render headless instead (--render out.gif, then copy the file) or run under a virtual "
                    "display (xvfb-run -a python visualize/view.py ...)")
NO_DISPLAY_ADVICE = NO_WINDOW_ADVICE + ", or over SSH log in with ssh -X"

_Window = ctypes.c_ulong            # XID
_Atom = ctypes.c_ulong
_PROP_MODE_REPLACE = 0
_ANY_PROPERTY_TYPE = 0


@lru_cache(maxsize=1)
def _libx11():
    """libX11 with the prototypes used here, or None where it cannot be loaded."""
    name = ctypes.util.find_library("X11") or "libX11.so.6"
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        return None
    vp, c_int, c_uint, c_long, c_ulong = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint, ctypes.c_long, ctypes.c_ulong
    protos = {
        "XOpenDisplay": (vp, [ctypes.c_char_p]),
        "XCloseDisplay": (c_int, [vp]),
        "XDefaultRootWindow": (_Window, [vp]),
        "XInternAtom": (_Atom, [vp, ctypes.c_char_p, c_int]),
        "XQueryTree": (c_int, [vp, _Window, ctypes.POINTER(_Window), ctypes.POINTER(_Window),
                               ctypes.POINTER(ctypes.POINTER(_Window)), ctypes.POINTER(c_uint)]),
        "XGetWindowProperty": (c_int, [vp, _Window, _Atom, c_long, c_long, c_int, _Atom, ctypes.POINTER(_Atom),
                                       ctypes.POINTER(c_int), ctypes.POINTER(c_ulong), ctypes.POINTER(c_ulong),
                                       ctypes.POINTER(ctypes.POINTER(ctypes.c_ubyte))]),
        "XChangeProperty": (c_int, [vp, _Window, _Atom, _Atom, c_int, c_int, ctypes.c_char_p, c_int]),
        "XFree": (c_int, [vp]),
        "XFlush": (c_int, [vp]),
        "XSync": (c_int, [vp, c_int]),
        "XSetErrorHandler": (vp, [vp]),
    }
    for fn, (res, args) in protos.items():
        f = getattr(lib, fn)
        f.restype, f.argtypes = res, args
    return lib


_ERROR_HANDLER = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
_ignore_error = _ERROR_HANDLER(lambda _dpy, _event: 0)     # kept alive for the process's lifetime


@contextmanager
def _errors_ignored(lib, dpy):
    """Xlib's default error handler exits the process (e.g. on a window that vanished while we looked at
    it); swap in one that ignores errors, for our own requests only (synced before restoring)."""
    old = lib.XSetErrorHandler(ctypes.cast(_ignore_error, ctypes.c_void_p))
    try:
        yield
    finally:
        lib.XSync(dpy, 0)
        lib.XSetErrorHandler(old)


def display_problem(env=None, platform: str | None = None) -> str | None:
    """One line saying why no window can be opened here and what to do instead, or None when it looks
    possible (or cannot be checked: not Linux, no libX11, Wayland without ``DISPLAY``)."""
    env = os.environ if env is None else env
    if not (platform or sys.platform).startswith("linux"):
        return None
    disp = env.get("DISPLAY")
    if not disp:
        if env.get("WAYLAND_DISPLAY"):
            return None
        return f"no display to open a window on (DISPLAY is not set): {NO_DISPLAY_ADVICE}"
    lib = _libx11()
    if lib is None:
        return None
    dpy = lib.XOpenDisplay(disp.encode())
    if not dpy:
        return f"cannot open the X display DISPLAY={disp}: {NO_DISPLAY_ADVICE}"
    lib.XCloseDisplay(dpy)
    return None


class WindowTitle:
    """The title of one top-level X window (found by its owner's pid and current title), settable."""

    def __init__(self, lib, dpy, window: int):
        self._lib, self._dpy, self.window = lib, dpy, window
        self._atoms = {n: lib.XInternAtom(dpy, n.encode(), 0)
                       for n in ("_NET_WM_NAME", "UTF8_STRING", "WM_NAME", "STRING", "_NET_WM_PID")}

    @classmethod
    def find(cls, title: str, pid: int | None = None, max_depth: int = 3) -> WindowTitle | None:
        """The window of process ``pid`` (default: this one) whose title is ``title``, or None when there is
        no X display, no libX11 or no such window (reparenting window managers: looked for ``max_depth``
        levels below the root)."""
        lib = _libx11()
        if lib is None or not os.environ.get("DISPLAY"):
            return None
        dpy = lib.XOpenDisplay(None)
        if not dpy:
            return None
        self = cls(lib, dpy, 0)
        pid = os.getpid() if pid is None else pid
        with _errors_ignored(lib, dpy):
            self.window = self._search(lib.XDefaultRootWindow(dpy), title.encode(), pid, max_depth)
        if not self.window:
            self.close()
            return None
        return self

    def _search(self, parent: int, title: bytes, pid: int, depth: int) -> int:
        root, par, n = _Window(), _Window(), ctypes.c_uint()
        children = ctypes.POINTER(_Window)()
        if not self._lib.XQueryTree(self._dpy, parent, ctypes.byref(root), ctypes.byref(par),
                                    ctypes.byref(children), ctypes.byref(n)):
            return 0
        kids = [children[i] for i in range(n.value)]
        if children:
            self._lib.XFree(children)
        for w in kids:
            owner = self._property(w, "_NET_WM_PID")
            if owner is not None and owner[1] == 32 and len(owner[0]) >= ctypes.sizeof(ctypes.c_long) \
                    and ctypes.c_long.from_buffer_copy(owner[0][:ctypes.sizeof(ctypes.c_long)]).value == pid:
                name = self._property(w, "_NET_WM_NAME") or self._property(w, "WM_NAME")
                if name is not None and name[0] == title:
                    return w
        if depth > 1:
            for w in kids:
                found = self._search(w, title, pid, depth - 1)
                if found:
                    return found
        return 0

    def _property(self, window: int, name: str) -> tuple[bytes, int] | None:
        """(raw bytes, format) of a window property, or None. Format-32 items are C longs in memory."""
        typ, fmt, n, after = _Atom(), ctypes.c_int(), ctypes.c_ulong(), ctypes.c_ulong()
        data = ctypes.POINTER(ctypes.c_ubyte)()
        ok = self._lib.XGetWindowProperty(self._dpy, window, self._atoms[name], 0, 4096, 0, _ANY_PROPERTY_TYPE,
                                          ctypes.byref(typ), ctypes.byref(fmt), ctypes.byref(n),
                                          ctypes.byref(after), ctypes.byref(data))
        if ok != 0 or not data:
            return None
        try:
            size = {8: 1, 16: ctypes.sizeof(ctypes.c_short), 32: ctypes.sizeof(ctypes.c_long)}.get(fmt.value, 0)
            return ctypes.string_at(data, n.value * size), fmt.value
        finally:
            self._lib.XFree(data)

    def title(self) -> str | None:
        """The window's title as the window system has it now (``_NET_WM_NAME``, else ``WM_NAME``)."""
        if not self._dpy:
            return None
        with _errors_ignored(self._lib, self._dpy):
            p = self._property(self.window, "_NET_WM_NAME") or self._property(self.window, "WM_NAME")
        return None if p is None else p[0].decode("utf-8", "replace")

    def set(self, title: str) -> None:
        """Set the title (UTF-8 ``_NET_WM_NAME`` for window managers, Latin-1 ``WM_NAME`` for the rest)."""
        if not self._dpy:
            return
        a = self._atoms
        utf8, latin1 = title.encode("utf-8"), title.encode("latin-1", "replace")
        with _errors_ignored(self._lib, self._dpy):
            self._lib.XChangeProperty(self._dpy, self.window, a["_NET_WM_NAME"], a["UTF8_STRING"], 8,
                                      _PROP_MODE_REPLACE, utf8, len(utf8))
            self._lib.XChangeProperty(self._dpy, self.window, a["WM_NAME"], a["STRING"], 8, _PROP_MODE_REPLACE,
                                      latin1, len(latin1))
            self._lib.XFlush(self._dpy)

    def close(self) -> None:
        if self._dpy:
            self._lib.XCloseDisplay(self._dpy)
            self._dpy = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

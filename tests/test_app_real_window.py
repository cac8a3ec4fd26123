"""The app in a real X window (Xvfb) at 1366×768 and 1920×1080 with fresh settings: screenshots of each
state and the layout facts Qt can tell (klviewer.app.screen_check). Offscreen Qt cannot show these:
its screen has no size a user has, and nothing is mapped.

Needs Xvfb and the xcb libraries Qt's xcb plugin loads; as root they are installed with apt-get,
otherwise the test is skipped and says what to install.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


APT_PACKAGES = ["xvfb", "xauth", "libxcb-cursor0", "libxcb-icccm4", "libxcb-keysyms1", "libxcb-image0",
                "libxcb-render-util0", "libxcb-xinerama0", "libxcb-xkb1", "libxkbcommon-x11-0", "libxcb-shape0",
                "libxcb-randr0", "libegl1", "libgl1", "libfontconfig1", "libdbus-1-3"]
SCREENS = ("1366x768", "1920x1080")


def _have_xvfb() -> bool:
    return shutil.which("xvfb-run") is not None and shutil.which("Xvfb") is not None


def _install() -> str | None:
    """Install what the xcb plugin needs; None when it worked, else why the test must skip."""
    if _have_xvfb():
        return None
    if os.name != "posix" or os.geteuid() != 0 or shutil.which("apt-get") is None:
        return "needs Xvfb and the xcb libraries: apt-get install " + " ".join(APT_PACKAGES)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *APT_PACKAGES]):
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
        if done.returncode != 0:
            return f"could not install Xvfb ({' '.join(command[:2])}: {done.stderr.strip()[-300:]})"
    return None if _have_xvfb() else "Xvfb still missing after apt-get install"


@pytest.fixture(scope="module")
def xvfb() -> None:
    reason = _install()
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.parametrize("screen", SCREENS)
def test_real_window_layout_and_screenshots(xvfb, screen: str, tiny_prior: Path, tmp_path: Path) -> None:
    out = tmp_path / "shots"
    env = {k: v for k, v in os.environ.items() if k not in ("QT_QPA_PLATFORM", "DISPLAY", "WAYLAND_DISPLAY")}
    env.update(QT_QPA_PLATFORM="xcb", KLVIEWER_CACHE_DIR=os.environ.get("KLVIEWER_CACHE_DIR", str(tmp_path / "cache")))
    done = subprocess.run(
        ["xvfb-run", "-a", "-s", f"-screen 0 {screen}x24", sys.executable, "-m", "klviewer.app.screen_check",
         "--out", str(out), "--prior", str(tiny_prior), "--steps", "4"],
        capture_output=True, text=True, env=env, timeout=300)
    report_path = out / f"{screen}-layout.json"
    assert report_path.is_file(), done.stderr[-2000:]
    report = json.loads(report_path.read_text())
    assert report["screen"] == screen
    width, height = (int(v) for v in screen.split("x"))
    for step in report["steps"]:
        x, y, w, h = step["window"]
        assert 0 <= x and 0 <= y and x + w <= width and y + h <= height, f"{step['step']}: window off the screen"
        assert step["problems"] == [], f"{step['step']}: {step['problems']}"
        assert (out / step["screenshot"]).stat().st_size > 10_000, "a real picture of the screen"
    assert [s["step"] for s in report["steps"] if not s["ok"]] == ["z-view", "mismatch-banner"], \
        "every other state was reached (the tiny prior has no healthy reference and no prior-fit threshold)"
    assert done.returncode == 0, done.stderr[-2000:]

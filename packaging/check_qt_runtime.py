"""Check that a Qt platform plugin can load on this Linux machine, before `make run` / `make test`.

PySide6's wheels carry Qt itself but not the system libraries that Qt links against: the X11
(xcb) plugin needs libxcb-cursor0, libxcb-icccm4, libxcb-keysyms1 and more, and Qt's GUI
module, which even the offscreen plugin of the tests loads, needs libEGL, libfontconfig, glib
and a few others. Without them the app aborts with "Could not load the Qt platform plugin".
This script asks the dynamic linker (`ldd`) which of the plugin's libraries are missing, maps
them to Debian/Ubuntu packages, then installs them with apt-get when run as root, or prints
the exact command and exits 1.

    .venv/bin/python packaging/check_qt_runtime.py                       # the app's window (xcb)
    .venv/bin/python packaging/check_qt_runtime.py --platform offscreen  # the tests

The platform defaults to $QT_QPA_PLATFORM, else xcb. Run it with the Python that has PySide6.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

# Shared library (soname) -> the Debian/Ubuntu package that provides it. These are the
# libraries that the xcb plugin and Qt's GUI module load, found by `ldd` on a minimal Debian
# bookworm image; apt brings their own dependencies. On Ubuntu 24.04, apt maps the few
# renamed ones (libglib2.0-0 -> libglib2.0-0t64) by itself.
DEBIAN_PACKAGES = {
    "libEGL.so.1": "libegl1",
    "libGL.so.1": "libgl1",
    "libOpenGL.so.0": "libopengl0",
    "libX11-xcb.so.1": "libx11-xcb1",
    "libX11.so.6": "libx11-6",
    "libdbus-1.so.3": "libdbus-1-3",
    "libfontconfig.so.1": "libfontconfig1",
    "libfreetype.so.6": "libfreetype6",
    "libglib-2.0.so.0": "libglib2.0-0",
    "libgthread-2.0.so.0": "libglib2.0-0",
    "libxcb-cursor.so.0": "libxcb-cursor0",
    "libxcb-icccm.so.4": "libxcb-icccm4",
    "libxcb-image.so.0": "libxcb-image0",
    "libxcb-keysyms.so.1": "libxcb-keysyms1",
    "libxcb-randr.so.0": "libxcb-randr0",
    "libxcb-render-util.so.0": "libxcb-render-util0",
    "libxcb-render.so.0": "libxcb-render0",
    "libxcb-shape.so.0": "libxcb-shape0",
    "libxcb-shm.so.0": "libxcb-shm0",
    "libxcb-sync.so.1": "libxcb-sync1",
    "libxcb-util.so.1": "libxcb-util1",
    "libxcb-xfixes.so.0": "libxcb-xfixes0",
    "libxcb-xkb.so.1": "libxcb-xkb1",
    "libxcb.so.1": "libxcb1",
    "libxkbcommon-x11.so.0": "libxkbcommon-x11-0",
    "libxkbcommon.so.0": "libxkbcommon0",
}
# Not linked, but without any font Qt draws no text: a minimal image has none.
FONT_PACKAGE = "fonts-dejavu-core"
FONT_SUFFIXES = {".ttf", ".otf", ".ttc", ".pfb", ".pcf", ".gz"}
FONT_FOLDERS = (Path("/usr/share/fonts"), Path("/usr/local/share/fonts"), Path.home() / ".fonts",
                Path.home() / ".local/share/fonts")


def platform_plugin(platform: str) -> Path | None:
    """Qt's plugin for `platform` (xcb, offscreen, wayland, ...) inside the installed PySide6, if any."""
    spec = importlib.util.find_spec("PySide6")
    if spec is None or not spec.submodule_search_locations:
        return None
    plugin = Path(spec.submodule_search_locations[0]) / "Qt" / "plugins" / "platforms" / f"libq{platform}.so"
    return plugin if plugin.is_file() else None


def missing_libraries(ldd_output: str) -> list[str]:
    """Sonames that `ldd` reports as `not found`, each once, in order."""
    missing: list[str] = []
    for line in ldd_output.splitlines():
        name, _, where = line.strip().partition(" => ")
        if where.strip() == "not found" and name not in missing:
            missing.append(name)
    return missing


def ldd_missing(library: Path) -> list[str]:
    """What the dynamic linker cannot find for `library` (and what it links, transitively)."""
    ldd = subprocess.run(["ldd", str(library)], capture_output=True, text=True, check=False)
    return missing_libraries(ldd.stdout)


def packages_for(sonames: list[str]) -> tuple[list[str], list[str]]:
    """(Debian packages that provide `sonames`, sonames with no known package)."""
    packages = sorted({DEBIAN_PACKAGES[s] for s in sonames if s in DEBIAN_PACKAGES})
    return packages, [s for s in sonames if s not in DEBIAN_PACKAGES]


def has_fonts() -> bool:
    return any(path.suffix.lower() in FONT_SUFFIXES for folder in FONT_FOLDERS if folder.is_dir()
               for path in folder.rglob("*"))


def apt_command(packages: list[str], as_root: bool) -> list[str]:
    prefix = [] if as_root else ["sudo"]
    return [*prefix, "apt-get", "install", "-y", "--no-install-recommends", *packages]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check (and as root, install) the system libraries Qt needs.")
    # QT_QPA_PLATFORM may list fallbacks ("wayland;xcb") and carry options ("xcb:foo=1"): the first one counts.
    default = os.environ.get("QT_QPA_PLATFORM", "").split(";")[0].partition(":")[0] or "xcb"
    parser.add_argument("--platform", default=default, help=f"Qt platform plugin to check (default {default})")
    platform = parser.parse_args(argv).platform
    if not sys.platform.startswith("linux"):
        return 0
    plugin = platform_plugin(platform)
    if plugin is None:
        print(f"check_qt_runtime: no Qt platform plugin {platform!r} in this Python's PySide6", file=sys.stderr)
        return 1
    if shutil.which("ldd") is None:
        print("check_qt_runtime: no ldd here; cannot check Qt's system libraries (skipped)", file=sys.stderr)
        return 0
    missing = ldd_missing(plugin)
    packages, unknown = packages_for(missing)
    if not has_fonts():
        packages.append(FONT_PACKAGE)
    if not packages and not unknown:
        return 0
    as_root = hasattr(os, "geteuid") and os.geteuid() == 0
    if packages and as_root and shutil.which("apt-get"):
        print(f"Installing the system libraries that Qt's {platform} platform needs: {' '.join(packages)}")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)  # a fresh machine has no package lists
        subprocess.run(apt_command(packages, as_root=True), check=True, env=env)
        still = ldd_missing(plugin)
        if still:
            print("check_qt_runtime: still missing after apt-get install: " + ", ".join(still), file=sys.stderr)
        return 1 if still else 0
    print(f"Qt's {platform} platform plugin needs system libraries that are missing here: "
          + (", ".join(missing) or "fonts"), file=sys.stderr)
    if packages:
        print("On Debian or Ubuntu install them with:\n\n    " + " ".join(apt_command(packages, as_root)) + "\n",
              file=sys.stderr)
    if unknown:
        print("Also missing (install the package that provides each): " + ", ".join(unknown), file=sys.stderr)
    print("Then run the make command again.", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())

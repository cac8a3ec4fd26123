#!/usr/bin/env bash
# Check the README's two commands on a fresh Debian machine: a minimal Debian bookworm made with
# debootstrap, plus only what the README asks for (Python 3.11 with venv, git, make).
#
#   sudo packaging/fresh-machine-check.sh [WORKDIR]     (default WORKDIR: /tmp/klviewer-fresh)
#
# Needs root, debootstrap and Xvfb on the host (apt-get install debootstrap xvfb), and the Debian
# mirror and PyPI. It runs, in this order, each in a fresh clone of this repository's HEAD:
#   1. `make run` as an ordinary user: must stop and print the apt-get command for Qt's libraries;
#   2. `make test` as root: must pass, and must not have installed the xcb libraries;
#   3. `make run` as root: must install the xcb libraries with apt and open the app in a real
#      X11 window (on the host's Xvfb), analyse the demo's shown slice, and save a screenshot.
# The host's network set-up is lent to the image: its CA certificates (for a machine behind a
# TLS-inspecting proxy) and, where it keeps them, a local torch wheel and pip configuration
# (/opt/wheels, /etc/pip.conf, as on this project's machines), so that pip takes the same CPU
# torch build instead of downloading a CUDA one.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-/tmp/klviewer-fresh}
root=$work/root
display=:77
mounts=()

cleanup() {
    for ((i = ${#mounts[@]} - 1; i >= 0; i--)); do umount -l "${mounts[i]}" 2>/dev/null || true; done
    [[ -n ${xvfb_pid:-} ]] && kill "$xvfb_pid" 2>/dev/null || true
}
trap cleanup EXIT

bind() {  # bind SOURCE into the image at the same path (read-only if $2 is ro)
    mkdir -p "$root$1"
    mount --bind "$1" "$root$1"
    mounts+=("$root$1")
    if [[ ${2:-} == ro ]]; then mount -o remount,bind,ro "$root$1"; fi
}

in_image() { chroot "$root" /usr/bin/env -i HOME=/root PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "$@"; }

rm -rf "$work"
mkdir -p "$work"
echo "== debootstrap (minbase bookworm) into $root"
debootstrap --variant=minbase bookworm "$root" http://deb.debian.org/debian >"$work/debootstrap.log"
cp /etc/resolv.conf "$root/etc/resolv.conf"
mount -t proc proc "$root/proc"; mounts+=("$root/proc")
bind /dev
bind /dev/pts
bind /dev/shm
for d in /opt/wheels /opt/pypi /opt/pypi-more; do [[ -d $d ]] && bind "$d" ro; done
[[ -f /etc/pip.conf ]] && cp /etc/pip.conf "$root/etc/pip.conf"
[[ -d /etc/xdg/pip ]] && mkdir -p "$root/etc/xdg" && cp -r /etc/xdg/pip "$root/etc/xdg/"

echo "== what the README asks for: python3 (3.11), python3-venv, git, make"
in_image apt-get update -qq
in_image env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    python3 python3-venv git make ca-certificates >"$work/apt.log"
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
in_image python3 --version
git -C "$repo" bundle create "$root/klviewer.bundle" HEAD >/dev/null 2>&1
clone() { in_image git -c advice.detachedHead=false clone -q /klviewer.bundle "$1"; }

echo "== 1. make run as an ordinary user: must print the apt-get command and stop"
in_image useradd -m user
in_image chmod 644 /klviewer.bundle
in_image su user -c "git -c advice.detachedHead=false clone -q /klviewer.bundle /home/user/klviewer"
if in_image su user -c "cd /home/user/klviewer && make run" >"$work/run-user.log" 2>&1; then
    echo "FAIL: make run went on without Qt's libraries"; exit 1
fi
grep -A2 "install them with" "$work/run-user.log"
grep -q "sudo apt-get install -y --no-install-recommends .*libxcb-cursor0" "$work/run-user.log"

echo "== 2. make test as root (Qt offscreen): must pass without the xcb libraries"
clone /root/klviewer-test
in_image bash -c "cd /root/klviewer-test && make test" >"$work/test.log" 2>&1 || { tail -30 "$work/test.log"; exit 1; }
tail -1 "$work/test.log"
if in_image dpkg -s libxcb-cursor0 >/dev/null 2>&1; then echo "FAIL: make test installed libxcb-cursor0"; exit 1; fi
echo "libxcb-cursor0 is still not installed"

echo "== 3. make run as root: installs the xcb libraries, opens a real X11 window"
Xvfb "$display" -screen 0 1600x1000x24 -nolisten tcp >"$work/xvfb.log" 2>&1 &
xvfb_pid=$!
sleep 2
bind /tmp/.X11-unix
clone /root/klviewer
in_image bash -c "cd /root/klviewer && DISPLAY=$display make run ARGS='--analyze --screenshot /root/run.png --quit'" \
    >"$work/run-root.log" 2>&1 || { tail -30 "$work/run-root.log"; exit 1; }
grep "Installing the system libraries" "$work/run-root.log"
cp "$root/root/run.png" "$work/run.png"
echo "OK: screenshot of the app on a fresh machine: $work/run.png; logs in $work"

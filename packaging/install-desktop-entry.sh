#!/bin/sh
# Add klviewer to this user's application menu (no root needed): writes
# klviewer.desktop and the icon under ${XDG_DATA_HOME:-~/.local/share}, pointing at the
# klviewer executable beside this script (the desktop bundle's folder).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
data=${XDG_DATA_HOME:-$HOME/.local/share}
mkdir -p "$data/applications" "$data/icons/hicolor/256x256/apps"
cp "$here/klviewer.png" "$data/icons/hicolor/256x256/apps/klviewer.png"
sed -e "s|^Exec=.*|Exec=\"$here/klviewer\" gui %F|" -e "s|^TryExec=.*|TryExec=$here/klviewer|" \
    "$here/klviewer.desktop" > "$data/applications/klviewer.desktop"
echo "added $data/applications/klviewer.desktop (remove it to undo)"

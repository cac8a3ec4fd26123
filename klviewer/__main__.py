import sys

from klviewer.cli import main


def gui() -> int:
    """The `klviewer-gui` launcher: `klviewer gui` with the launcher's arguments (files to open)."""
    args = sys.argv[1:]
    return main(args if args == ["--version"] else ["gui", *args])


if __name__ == "__main__":
    sys.exit(main())

"""Entry point of the desktop bundle: the `klviewer` command (with no command: the app)."""

import multiprocessing
import sys

from klviewer.cli import main

if __name__ == "__main__":
    # Batch workers and phantom pools are spawned processes; in a frozen bundle each one starts
    # the bundle's executable again, and this hands it over to multiprocessing.
    multiprocessing.freeze_support()
    sys.exit(main())

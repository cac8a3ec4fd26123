"""The desktop app.

Following napari's split, the plain-Python models (`cases`, `display`, `session`) import no Qt,
so batch runs and exports can reuse them; every other module here is a Qt view or controller.
Importing this package itself loads no Qt.
"""

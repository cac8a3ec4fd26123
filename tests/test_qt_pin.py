"""PySide6 6.12.0 on Python < 3.12 drops a reference to None on every void Qt call; the
process then aborts with `none_dealloc`. The pin in pyproject.toml keeps it out."""

import sys

import pytest


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="None is immortal from Python 3.12 on")
def test_void_qt_calls_leave_none_refcount_unchanged() -> None:
    from PySide6.QtCore import QRectF

    QRectF().setWidth(1.0)  # warm up: first calls may cache objects
    before = sys.getrefcount(None)
    for _ in range(1000):
        QRectF().setWidth(1.0)
    after = sys.getrefcount(None)
    assert abs(after - before) <= 5, f"None refcount drifted by {after - before} over 1000 void calls"

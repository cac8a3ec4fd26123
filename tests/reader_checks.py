"""What the reader tests share: the problem a reader reports for an input it refuses."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from klviewer.errors import KlviewerInputError


def refusal(read: Callable[..., Any], *args: Any, names: Path | None = None) -> str:
    """Call `read(*args)`, expect a KlviewerInputError, and return its problem text.

    With `names`, the error must name that file too (every refusal names the input at fault).
    """
    with pytest.raises(KlviewerInputError) as info:
        read(*args)
    if names is not None:
        assert info.value.path == names
    return info.value.problem

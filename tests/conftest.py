import os

# Qt must be headless before any Qt module loads, in every test process.
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("PYQTGRAPH_QT_LIB", "PySide6")

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep the demo study and other cached files out of the user's real cache directory."""
    os.environ["KLVIEWER_CACHE_DIR"] = str(tmp_path_factory.mktemp("klviewer-cache"))

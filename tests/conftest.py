import os

# Qt must be headless before any Qt module loads, in every test process.
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("PYQTGRAPH_QT_LIB", "PySide6")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

TINY_PRIOR_SIZE = 32


@pytest.fixture(scope="session")
def tiny_prior(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small untrained EDM-UNet prior (32x32) saved as a checkpoint folder, for fast end-to-end runs."""
    from klviewer.priors import EDMUNetPrior, PriorConfig, save_prior

    torch.manual_seed(0)
    config = PriorConfig(name="tiny-test", architecture="edm-unet", image_size=(TINY_PRIOR_SIZE, TINY_PRIOR_SIZE),
                         pixel_spacing_mm=400 / TINY_PRIOR_SIZE,
                         arch={"channels": [8, 16], "emb_dim": 16, "fourier_features": 8, "groups": 4})
    prior = EDMUNetPrior(config)
    with torch.no_grad():  # the output layer starts at zero; give the untrained net a real response
        for p in prior.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return save_prior(prior, tmp_path_factory.mktemp("priors") / "tiny-test")


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep the demo study and other cached files out of the user's real cache directory."""
    os.environ["KLVIEWER_CACHE_DIR"] = str(tmp_path_factory.mktemp("klviewer-cache"))


@pytest.fixture(autouse=True)
def _bfloat16_in_hardware(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test sees a device with bfloat16 in hardware, so a profile's settings do not depend on the CPU that
    runs the tests; the tests of the float32 fallback patch it off."""
    monkeypatch.setattr("klviewer.inference.precision.bfloat16_is_native", lambda device: True)

"""klviewer: where a CT study lies outside a diffusion prior's distribution."""

__version__ = "0.1.0"

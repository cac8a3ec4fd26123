"""Draw klviewer's icon: a CT slice (body, spine) with a KL hot spot outlined, as the app shows.

    python packaging/make_icon.py packaging/klviewer.png

It is drawn with Pillow at 4x and scaled down, so the edges are smooth at 256 px.
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

SIZE = 256
SCALE = 4


def draw_icon(size: int = SIZE) -> Image.Image:
    s = size * SCALE

    def box(x0: float, y0: float, x1: float, y1: float) -> tuple[int, int, int, int]:
        """A box given in fractions of the icon's side."""
        return round(x0 * s), round(y0 * s), round(x1 * s), round(y1 * s)

    icon = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    draw = ImageDraw.Draw(icon)
    draw.rounded_rectangle(box(0.02, 0.02, 0.98, 0.98), radius=round(0.18 * s), fill=(18, 20, 32, 255))
    draw.ellipse(box(0.12, 0.24, 0.88, 0.80), fill=(92, 92, 96, 255))  # fat rim
    draw.ellipse(box(0.17, 0.29, 0.83, 0.75), fill=(142, 142, 146, 255))  # soft tissue
    draw.ellipse(box(0.24, 0.34, 0.52, 0.62), fill=(170, 170, 174, 255))  # liver
    draw.ellipse(box(0.56, 0.38, 0.70, 0.52), fill=(30, 30, 34, 255))  # bowel gas
    draw.ellipse(box(0.44, 0.60, 0.56, 0.72), fill=(245, 245, 245, 255))  # vertebra

    # The KL overlay: an inferno-coloured blob, blurred, on the liver lesion.
    heat = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    heat_draw = ImageDraw.Draw(heat)
    heat_draw.ellipse(box(0.28, 0.38, 0.50, 0.60), fill=(188, 55, 84, 200))
    heat_draw.ellipse(box(0.32, 0.42, 0.46, 0.56), fill=(249, 142, 9, 230))
    heat_draw.ellipse(box(0.36, 0.46, 0.42, 0.52), fill=(252, 255, 164, 255))
    icon = Image.alpha_composite(icon, heat.filter(ImageFilter.GaussianBlur(0.02 * s)))

    # The flag outline the viewer draws around a flagged patch.
    ImageDraw.Draw(icon).rectangle(box(0.25, 0.35, 0.53, 0.63), outline=(80, 220, 255, 255), width=round(0.02 * s))
    return icon.resize((size, size), Image.Resampling.LANCZOS)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    draw_icon().save(Path(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

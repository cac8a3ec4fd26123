"""The banner over the viewer: when the prior does not describe the study, and when its geometry is far from the prior's.

A prior-fit mismatch is the first thing a reader must see: the local KL maps, z-scores and flags
under it are not meaningful. Geometry warnings (coarse pixels, a small or cut field of view) say
why a result may mislead even when the prior fits.
"""

from __future__ import annotations

from html import escape

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QLabel, QWidget

from klviewer.inference.prior_fit import is_mismatch
from klviewer.inference.result import SliceResult

MISMATCH_STYLE = "background: #7a1f12; color: white; padding: 6px 10px; font-weight: 600;"
WARNING_STYLE = "background: #5c4a12; color: white; padding: 4px 10px;"


def banner_html(result: SliceResult | None) -> tuple[str, str] | None:
    """(html, style) of the banner for an analysed slice, or None when there is nothing to warn about."""
    if result is None:
        return None
    warnings = "".join(f"<br>• {escape(w)}" for w in result.geometry_warnings)
    fit = result.prior_fit
    if is_mismatch(fit):
        text = (f"Prior mismatch: {escape(result.prior_name)} does not describe this study (prior fit {fit.score:.3g} "
                f"&gt; {fit.threshold:.3g} nats per body pixel). Its KL maps, z-scores and flags are not meaningful "
                f"here; adapt a prior to your site's healthy studies (Analysis → Adapt prior to my studies…).")
        return text + warnings, MISMATCH_STYLE
    if warnings:
        return "Geometry far from the prior's:" + warnings, WARNING_STYLE
    return None


class StudyBanner(QLabel):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("studyBanner")
        self.setWordWrap(True)
        self.setTextFormat(Qt.TextFormat.RichText)
        self.hide()

    def show_for(self, result: SliceResult | None) -> None:
        content = banner_html(result)
        if content is None:
            self.clear()
            self.hide()
            return
        html, style = content
        self.setText(html)
        self.setStyleSheet(style)
        self.show()

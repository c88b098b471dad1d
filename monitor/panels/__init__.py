"""The dashboard's panels beside the plots, one module each. `PANELS` is the one list the app composes,
arranges, refreshes and cycles views (`v`) through, in this order; adding a panel is its module plus its
line here."""

from __future__ import annotations

from .alerts import AlertsPanel
from .base import DrawContext, Panel
from .curriculum import CurriculumPanel
from .eval import EvalPanel
from .router import RouterPanel
from .stats import StatsPanel
from .system import SystemPanel

PANELS: list[type[Panel]] = [StatsPanel, SystemPanel, AlertsPanel, CurriculumPanel, EvalPanel, RouterPanel]

__all__ = ["PANELS", "DrawContext", "Panel"]

"""The index advisor: finds the statements that cost the most time, asks the planner
about them on a connection of its own, and reports the indexes it proved (missing_index).

Only proxy.server imports this package: it runs beside the relay, never on its path.
"""

from __future__ import annotations

from proxy.advisor.advisor import Advisor

__all__ = ["Advisor"]

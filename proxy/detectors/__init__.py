"""Detectors, one module per rule; adding a rule means adding a module and a line here."""

from proxy.detectors.base import Detector, SessionIdentity
from proxy.detectors.insert_loop import InsertLoop
from proxy.detectors.n_plus_one import NPlusOne
from proxy.detectors.slow_query import SlowQuery

__all__ = ["DETECTORS", "Detector", "SessionIdentity"]

DETECTORS: dict[str, type[Detector]] = {cls.rule: cls for cls in (NPlusOne, InsertLoop, SlowQuery)}

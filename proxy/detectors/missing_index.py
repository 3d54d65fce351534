"""missing_index: the index advisor's rule. The advisor (proxy.advisor) proves an index
with the planner, outside any session; this module only declares the rule and its
options, so they sit with the other rules under `detectors:`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from proxy.detectors.base import Detector, DetectorOptions

__all__ = ["MissingIndex", "MissingIndexOptions"]


@dataclass(frozen=True)
class MissingIndexOptions(DetectorOptions):
    # tables smaller than this (the planner's row estimate) are read whole cheaply enough
    min_table_rows: int = field(default=10000, metadata={"minimum": 0})
    # the share of the statement's plan cost the index must save (Dexter's 50%)
    min_saving: float = field(default=0.5, metadata={"minimum": 0.0, "maximum": 1.0})


class MissingIndex(Detector):
    rule: ClassVar[str] = "missing_index"
    options_type: ClassVar[type[DetectorOptions]] = MissingIndexOptions
    per_session: ClassVar[bool] = False

"""Detectors, one module per rule; adding a rule means adding a module and a line here.

The registry is the one list of rules: the config's `detectors:` section is built from it
(each rule's block from its `options_type`), and sessions get their detectors from it.
"""

from __future__ import annotations

from collections.abc import Mapping

from proxy.detectors.applications import Applications
from proxy.detectors.base import Detector, DetectorOptions, SessionIdentity
from proxy.detectors.catalog_polling import CatalogPolling
from proxy.detectors.check_then_write import CheckThenWrite
from proxy.detectors.connection_churn import ConnectionChurn
from proxy.detectors.insert_loop import InsertLoop
from proxy.detectors.leading_wildcard import LeadingWildcard
from proxy.detectors.long_transaction import LongTransaction
from proxy.detectors.missing_index import MissingIndex
from proxy.detectors.n_plus_one import NPlusOne
from proxy.detectors.not_in_subquery import NotInSubquery
from proxy.detectors.repeated_read import RepeatedRead
from proxy.detectors.select_star import SelectStar
from proxy.detectors.slow_query import SlowQuery
from proxy.detectors.unbounded_result import UnboundedResult
from proxy.detectors.unwrapped_writes import UnwrappedWrites
from proxy.detectors.write_loop import WriteLoop
from proxy.logs import get_logger

__all__ = [
    "DETECTORS",
    "Applications",
    "Detector",
    "DetectorOptions",
    "SessionIdentity",
    "build_detectors",
]

log = get_logger("pgwarden.detectors")

DETECTORS: dict[str, type[Detector]] = {
    cls.rule: cls
    for cls in (
        NPlusOne,
        InsertLoop,
        WriteLoop,
        SlowQuery,
        NotInSubquery,
        LeadingWildcard,
        MissingIndex,
        RepeatedRead,
        CatalogPolling,
        SelectStar,
        UnboundedResult,
        ConnectionChurn,
        UnwrappedWrites,
        CheckThenWrite,
        LongTransaction,
    )
}


def build_detectors(
    options_by_rule: Mapping[str, DetectorOptions],
    identity: SessionIdentity,
    applications: Applications | None = None,
) -> list[Detector]:
    """One session's detectors, from each enabled rule's options (`DetectorSettings.enabled`).

    Runs on the relay path, at session start: a rule that is not registered, options that
    are not its own, or a detector that fails to construct is logged and left out, and the
    session goes on with the others rather than failing."""
    detectors = []
    for rule, options in options_by_rule.items():
        try:
            cls = DETECTORS[rule]
            if not cls.per_session:
                continue
            if not isinstance(options, cls.options_type):
                raise TypeError(f"{type(options).__name__} is not {cls.options_type.__name__}")
            detectors.append(cls(options, identity, applications))
        except Exception:
            log.exception("detector_failed", rule=rule, action="left out of the session")
    return detectors

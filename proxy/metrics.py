"""Prometheus metrics in a registry of pgwarden's own.

Children of labelled metrics are bound once and kept, so the relay path records with a
plain method call and no label lookup.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from proxy import __version__

__all__ = ["Metrics"]

CONNECTION_ERROR_KINDS = (
    "protocol_violation",
    "startup_timeout",
    "too_many_connections",
    "upstream_connect",
    "upstream_lost",
    "tls",
)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        Info("pgwarden_build", "pgwarden build information", registry=r).info(
            {"version": __version__}
        )
        self.client_connections = Gauge(
            "pgwarden_client_connections", "Client connections currently open", registry=r
        )
        self.client_connections_opened = Counter(
            "pgwarden_client_connections_opened",
            "Client connections accepted since start",
            registry=r,
        )
        self.server_connections = Gauge(
            "pgwarden_server_connections",
            "Connections to the upstream PostgreSQL currently open",
            registry=r,
        )
        errors = Counter(
            "pgwarden_connection_errors",
            "Client connections ended by an error, by kind",
            ["kind"],
            registry=r,
        )
        self.connection_errors = {kind: errors.labels(kind) for kind in CONNECTION_ERROR_KINDS}
        transferred = Counter(
            "pgwarden_bytes", "Bytes relayed, by direction", ["direction"], registry=r
        )
        self.bytes_from_client = transferred.labels("client_to_server")
        self.bytes_from_server = transferred.labels("server_to_client")
        self.connection_duration = Histogram(
            "pgwarden_client_connection_duration_seconds",
            "How long client connections stayed open",
            buckets=(0.01, 0.1, 0.5, 1, 5, 30, 60, 300, 1800, 3600, 14400, 86400),
            registry=r,
        )
        self.upstream_connect_duration = Histogram(
            "pgwarden_upstream_connect_duration_seconds",
            "Time to open a connection to the upstream, TLS included",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
            registry=r,
        )
        self.cancel_requests = Counter(
            "pgwarden_cancel_requests",
            "Cancel requests sent upstream, by origin",
            ["origin"],
            registry=r,
        )
        self.draining = Gauge(
            "pgwarden_draining", "1 while pgwarden drains before shutdown", registry=r
        )

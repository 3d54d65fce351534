"""pgwarden: a PostgreSQL wire-protocol sidecar proxy."""

__version__ = "0.1.0"

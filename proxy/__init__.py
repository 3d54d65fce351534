"""pgwarden: a PostgreSQL wire-protocol sidecar proxy."""

# First: decides whether the compiled analysis modules may load (proxy/native.py).
from proxy import native as native

__version__ = "0.1.0"

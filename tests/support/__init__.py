"""Helpers for the tests: the PostgreSQL server interface, waiting, pgwarden as a process."""

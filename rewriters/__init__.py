"""Rewrite and block rules, and the builders that turn detected loops into batched SQL."""

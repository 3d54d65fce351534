"""Rewrite and block rules, and the builders that turn a detected pattern into its fix."""

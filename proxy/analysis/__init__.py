"""Statement analysis with pglast."""

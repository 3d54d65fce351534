"""What pgwarden runs beside the proxy: the demo, a throwaway PostgreSQL cluster, reports."""

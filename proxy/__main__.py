"""`python -m proxy` is the `pgwarden` command."""

from proxy.cli import main

raise SystemExit(main())

"""`python -m cdp_fast ...` is the same as the `cdp-fast` command."""
from cdp_fast.cli import main

raise SystemExit(main())

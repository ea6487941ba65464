"""``python -m durably_web``: the same command line as the ``durably-web`` script."""

from .cli import main

raise SystemExit(main())

"""``python -m mailrouter`` is the ``mailrouter`` command."""

from mailrouter.cli import main

raise SystemExit(main())

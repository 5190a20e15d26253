"""``python -m inference_server``: see :mod:`inference_server.cli`."""

from inference_server.cli import main

raise SystemExit(main())

"""``python -m Ava`` runs the ``ava`` command line."""

import sys

from .cli.main import main

sys.exit(main())

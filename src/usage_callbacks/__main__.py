"""``python -m usage_callbacks`` runs the command-line interface."""

import sys

from usage_callbacks.cli import main

sys.exit(main())

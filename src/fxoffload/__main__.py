"""``python -m fxoffload``: the command line (see ``fxoffload.cli``)."""

import sys

from .cli import main

sys.exit(main())

"""Entry point for ``python -m dapt``."""

import sys

from dapt.cli import main

sys.exit(main())

"""`python3 -m pykvm` is the `pykvm` command."""

import sys

from .cli import main

sys.exit(main())

"""`python -m model_core ...` is `ar3d ...`."""

import sys

from .cli import main

sys.exit(main())

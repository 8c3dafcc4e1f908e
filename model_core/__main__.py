"""`python -m model_core ...` is `ar3d ...`."""

import sys

from model_core.cli import main

sys.exit(main())

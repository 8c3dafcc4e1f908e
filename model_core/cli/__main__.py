"""`python -m model_core.cli ...` (and `torchrun -m model_core.cli ...`) is `ar3d ...`."""

import sys

from model_core.cli import main

sys.exit(main())

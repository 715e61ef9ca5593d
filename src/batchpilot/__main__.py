"""Allow ``python -m batchpilot`` and ``torchrun -m batchpilot``."""

import sys

from batchpilot.cli import main

sys.exit(main())

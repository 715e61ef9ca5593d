"""Allow ``python -m batchpilot`` and ``torchrun -m batchpilot``."""

import sys

try:
    from batchpilot.cli import main
except KeyboardInterrupt:  # Ctrl-C during the first imports: one line, no traceback
    print("batchpilot: interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())

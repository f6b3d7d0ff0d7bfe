"""``python -m loramoe.cli`` (as ``torchrun`` / ``accelerate launch -m loramoe.cli`` start it)."""

import sys

from loramoe.cli import main

sys.exit(main())

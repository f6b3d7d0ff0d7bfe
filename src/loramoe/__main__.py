import sys

from loramoe.cli import main

sys.exit(main())

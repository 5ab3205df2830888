"""`python -m flip.data.prepare ...` is `flip-data ...`."""

import sys

from flip.data.prepare.cli import main

sys.exit(main())

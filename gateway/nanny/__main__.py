"""``python -m gateway.nanny``: see gateway.nanny.startup for the command line."""

import sys

from gateway.nanny.startup import main

sys.exit(main())

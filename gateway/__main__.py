"""`python -m gateway`: run a gateway (same as `bitfusion gateway`)."""

import sys

from gateway.app import main

sys.exit(main())

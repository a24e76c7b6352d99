"""`python -m bitfusion_jupyter`: the `bitfusion` command."""

import sys

from bitfusion_jupyter.cli import main

sys.exit(main())

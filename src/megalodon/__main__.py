"""`python -m megalodon ...` runs the `megalodon` command."""

import sys

from megalodon.cli import main

sys.exit(main())

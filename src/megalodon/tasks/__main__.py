"""`python -m megalodon.tasks NAME ...` is `megalodon tasks NAME ...`."""

import sys

from megalodon.cli import main

sys.exit(main(["tasks", *sys.argv[1:]]))

"""`python -m hyperbooth.cli …`: the same as the `hyperbooth` command."""

import sys

from hyperbooth.cli import main

sys.exit(main())

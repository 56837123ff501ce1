"""`python -m hyperbooth …` (and `accelerate launch -m hyperbooth train …`) run the CLI."""

import sys

from hyperbooth.cli import main

sys.exit(main())

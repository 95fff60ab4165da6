"""`python -m llama chat|complete ...`: see llama/cli.py."""

import sys

from llama.cli import main

sys.exit(main())

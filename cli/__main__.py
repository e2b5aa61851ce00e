"""`python -m cli ...` runs the `kb` command (as `torchrun -m cli` does for distributed fine-tuning)."""

import sys

from cli.main import main

sys.exit(main())

"""`python -m rlhf ...`: the same as the `rlhf` command."""

import sys

from rlhf.cli import main

if __name__ == "__main__":
    sys.exit(main())

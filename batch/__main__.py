"""`python -m batch`: the batch trainer's command line (batch/cli.py)."""
import os
import sys

from batch.cli import main

if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())

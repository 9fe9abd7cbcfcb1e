"""`python -m sefi_core.eval` (sefi_core/eval/cli.py)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())

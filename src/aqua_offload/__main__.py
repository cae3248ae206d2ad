"""``python -m aqua_offload``: the ``aqua-offload`` console script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m aqua_offload"))

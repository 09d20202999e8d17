"""``python -m tensorsam``: the ``tensorsam`` command."""

import sys

from tensorsam.cli import main

if __name__ == "__main__":
    sys.exit(main())

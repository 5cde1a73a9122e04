"""``python -m nostall ...``: the same as the ``nostall`` command."""

import sys

from nostall.cli._main import main

if __name__ == "__main__":
    sys.exit(main())

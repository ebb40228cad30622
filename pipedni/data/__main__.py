"""``python -m pipedni.data fetch|info NAME``: see pipedni/data/cli.py."""

import sys

from pipedni.data.cli import main

if __name__ == "__main__":
    sys.exit(main())

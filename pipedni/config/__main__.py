"""``python -m pipedni.config``: print the config reference table, or with a markdown path
(``python -m pipedni.config docs/config.md``) replace the table embedded there."""

from __future__ import annotations

import sys
from pathlib import Path

from pipedni.config.reference import reference_markdown, update_reference


def main(argv: list[str]) -> int:
    if argv:
        update_reference(Path(argv[0]))
    else:
        sys.stdout.write(reference_markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""``python -m pipedni.schedules [SCHEDULE N M]``: print a locked schedule's tick x stage grid."""

import sys

from pipedni.schedules.actions import LOCKED_PLANS, format_grid


def main(argv: list[str]) -> int:
    name = argv[0] if argv else "1f1b"
    try:
        stages = int(argv[1]) if len(argv) > 1 else 4
        micro = int(argv[2]) if len(argv) > 2 else 4
        print(format_grid(name, stages, micro))
    except ValueError as err:
        hint = "" if name in LOCKED_PLANS else " (only locked schedules have a fixed action list; see docs/design.md)"
        print(f"error: {err}{hint}; usage: python -m pipedni.schedules {{{'|'.join(LOCKED_PLANS)}}} N M",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The command line `python -m pipedni.data fetch|info NAME`: one line out, exit 2 on a data error."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from pipedni.config import DataConfig
from pipedni.data.registry import DATASETS, FETCHABLE, fetch, load_datasets, where
from pipedni.errors import DataError

DESCRIPTION = "Fetch or describe pipedni's data sets (IDX files, the mnist_5k CSV, kjv text, synthetic)."


def _info(name: str, root: str) -> None:
    train, test = load_datasets(DataConfig(name=name, root=root), seed=0)
    print(
        f"{name}: train {len(train)}, test {len(test)}, input shape {tuple(train.inputs.shape[1:])}, "
        f"{train.num_classes} classes ({where(name, root)})"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipedni.data", description=DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True)
    fetch_parser = commands.add_parser("fetch", help="make a data set's files available")
    fetch_parser.add_argument("name", choices=FETCHABLE)
    info_parser = commands.add_parser("info", help="print sizes, input shape and classes")
    info_parser.add_argument("name", choices=tuple(DATASETS))
    for sub in (fetch_parser, info_parser):
        sub.add_argument("--root", default="data", help="directory searched first (default: data)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "fetch":
            print(f"{args.name}: {DATASETS[args.name].files} in {fetch(args.name, args.root)}")
        else:
            _info(args.name, args.root)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0

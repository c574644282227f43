"""precompute CLI: `train`, `featurize`, `reindex`, `evaluate`. Run `python -m precompute COMMAND --help`."""

from __future__ import annotations

import argparse
import logging
import sys

from explorer.errors import ExplorerError
from precompute.cli_types import flag_hint
from precompute.featurize.cli import add_featurize
from precompute.train_cli import add_train

BUILD_COMMANDS = ("train", "featurize", "reindex")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m precompute", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", required=True)
    add_train(commands)
    add_featurize(commands)
    argv = sys.argv[1:] if argv is None else argv
    command = next((word for word in argv if not word.startswith("-")), None)
    if command not in BUILD_COMMANDS:  # the evaluation harness is imported only for `evaluate` (and --help)
        from precompute.evaluation.cli import add_evaluate

        add_evaluate(commands)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        args.run(args)
    except ExplorerError as error:
        print(f"error: {error}{flag_hint(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

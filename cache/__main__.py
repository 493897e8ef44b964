import sys
from pathlib import Path

from cache import DEFAULT_CACHE, CacheError
from cache.flags import OneLineParser
from cache.check import describe, find_problems


def get_args_parser(add_help=True):
    parser = OneLineParser("python -m cache", add_help=add_help, description="Inspect or verify a feature cache.")
    parser.add_argument("command", choices=["info", "verify"],
                        help="info: schema, provenance and counts; verify: integrity checks")
    parser.add_argument("path", nargs="?", default=DEFAULT_CACHE, help="the HDF5 cache")
    return parser


def main(args) -> int:
    if not Path(args.path).is_file():  # nothing to verify is a wrong argument, not a damaged cache
        print(f"error: no cache at {args.path}: run `python -m extract --data-dir DIR --split all --cache {args.path}` first",
              file=sys.stderr)
        return 2
    try:
        if args.command == "info":
            print(describe(args.path))
            return 0
        problems = find_problems(args.path)
    except CacheError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for problem in problems:
        print(f"problem: {problem}")
    print(f"{args.path}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))

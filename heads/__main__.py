"""`python -m heads` is not a command: it names the heads commands and exits 2, rather than
silently running one of them."""
import pkgutil
import sys
from pathlib import Path


def commands() -> list[str]:
    """Every `python -m heads.X` entry point: the modules of this package with a parser (read
    from their source, so that a new command is listed without being imported here)."""
    folder = Path(__file__).parent
    return [f"heads.{module.name}" for module in pkgutil.iter_modules([str(folder)])
            if not module.name.startswith("_") and not module.ispkg
            and "def get_args_parser" in (folder / f"{module.name}.py").read_text(encoding="utf-8")]


def main() -> int:
    print(f"python -m heads: give a command: {', '.join(f'python -m {c}' for c in commands())} "
          f"(each with --help)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

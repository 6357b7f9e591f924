"""``python -m qpack``: the same command line as the ``qpack`` console script."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())

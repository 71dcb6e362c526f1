"""`python -m jaxsmooth <command> ...`: the same as the `jaxsmooth` console script."""

from jaxsmooth.tools.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

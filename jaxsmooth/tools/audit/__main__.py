"""`python -m jaxsmooth.tools.audit ...`: the same as `jaxsmooth audit ...`."""

import sys

from jaxsmooth.tools.audit.report import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""``python -m elastic_ep``: see :mod:`elastic_ep.cli`."""

import sys

from elastic_ep.cli import main

if __name__ == "__main__":
    sys.exit(main())

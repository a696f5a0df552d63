"""``python -m lipflow.results``: see :mod:`lipflow.results.cli`."""

import sys

from lipflow.results.cli import main

sys.exit(main())

"""``python -m lipflow.plots``: the experiments' figures and tables (:mod:`lipflow.results.figures`)."""

import sys

from lipflow.results.figures import main

if __name__ == "__main__":
    sys.exit(main())

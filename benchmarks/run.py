"""Speed and memory benchmarks of normkit: ``python benchmarks/run.py --help``.

A thin wrapper around :func:`normkit._bench.main` (also ``normkit bench``); see
``benchmarks/README.md`` for what is measured and how to read the tables.
"""

import sys

from normkit._bench import main

if __name__ == "__main__":
    sys.exit(main())

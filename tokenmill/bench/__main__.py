"""`python -m tokenmill.bench ...`: the same as `tokenmill bench ...`."""

import sys

from tokenmill.bench.cli import main

sys.exit(main())

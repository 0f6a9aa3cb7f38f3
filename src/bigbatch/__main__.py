"""`python -m bigbatch` (and so `torchrun -m bigbatch`) runs the command line."""

import sys

from bigbatch.cli import main

sys.exit(main())

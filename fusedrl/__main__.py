"""`python -m fusedrl ...` is the `fusedrl` command."""

import sys

from fusedrl.cli import main

sys.exit(main())

"""`python -m lnfree …` — what torchrun launches (`torchrun --nproc-per-node N -m lnfree remove …`)."""

import sys

from .cli import main

sys.exit(main())

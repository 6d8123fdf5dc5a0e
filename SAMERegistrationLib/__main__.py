"""python -m SAMERegistrationLib: the same-register command."""

import sys

from .cli import main

sys.exit(main())

"""Entry point of ``python -m pytest_isolate``."""

import sys

from .doctor import main

sys.exit(main())

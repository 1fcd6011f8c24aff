"""``python -m smoa_mlx.train``."""

import sys

from .runner import main

sys.exit(main())

"""python -m bertqa: see bertqa.cli."""
import sys

from .cli import main

sys.exit(main())

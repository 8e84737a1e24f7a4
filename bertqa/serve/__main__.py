"""python -m bertqa.serve [flags]: the same endpoint as `bertqa serve`."""
import sys

from .cli import main

sys.exit(main())

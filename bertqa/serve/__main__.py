import sys

from .batcher import main

sys.exit(main())

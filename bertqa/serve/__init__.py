"""bertqa.serve as a package: everything still lives in batcher.py, which the next commits split by concern."""
from .batcher import *  # noqa: F401,F403

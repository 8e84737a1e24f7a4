"""What counts as a user error and how it is said, for the command line (bertqa.cli) and the SageMaker training
job (bertqa.training_job), which both report one in one line instead of a traceback.

A user error is bad input, not a bug: a bad flag value, an unreadable or malformed data file, a model folder
missing files, an output folder that cannot be written. The command line exits with EXIT_USER_ERROR after it.
"""
from __future__ import annotations

from .checkpoint import CheckpointError
from .config import ConfigError
from .squad import SquadFormatError
from .tokenization import TokenizerFilesError
from .train import TrainingError

EXIT_USER_ERROR = 2
USER_ERRORS = (SquadFormatError, CheckpointError, ConfigError, TokenizerFilesError, TrainingError,
               FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def user_message(e: BaseException) -> str:
    """The one line that reports e: "<file>: <reason>" for an OSError that names its file, else str(e)."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return str(e)

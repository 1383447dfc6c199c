"""The exceptions polymodal raises for problems a user can fix, one small hierarchy.

Every user-facing error derives from `PolymodalError`, so an API caller can catch them all in
one place, and the command line turns each into one line on stderr (`polymodal <command>: error:
<message>`) instead of a traceback. Messages name the file, field, key, argument or line at
fault. The classes also derive from the built-in exception a caller would expect (ValueError,
FileNotFoundError, FileExistsError), so `except ValueError` keeps working.

    PolymodalError
    ├── ConfigError            a config file or override that does not fit its dataclass, or is out of bounds
    ├── CheckpointError        a checkpoint that is missing, corrupt, truncated or does not fit its model
    │   └── NotACheckpointError    the path holds no checkpoint of the kind asked for
    ├── DataError              a data file or record that is malformed (readers skip and count these)
    ├── UsageError             a bad command-line or API argument (a negative temperature, n = 0, ...)
    ├── UnsupportedTaskError   the loaded model cannot do what was asked (`complete` on a CLIP model)
    ├── DestinationExistsError refusing to write over files polymodal did not write
    └── TrainingStopped        a run stopped early: interrupted, or a non-finite loss (CLI exit code 1)
"""
from __future__ import annotations


class PolymodalError(Exception):
    """Base class of every error polymodal raises for something the user can fix."""


class ConfigError(PolymodalError, ValueError):
    """A config file, override or stored config that does not fit its dataclass or its bounds."""


class CheckpointError(PolymodalError, ValueError):
    """A checkpoint file or folder that is corrupt, truncated, or does not fit the model it declares."""


class NotACheckpointError(CheckpointError, FileNotFoundError):
    """A path that holds no checkpoint of the kind asked for (names the path and what is missing)."""


class DataError(PolymodalError, ValueError):
    """A sample, record or data file is malformed; the message names the file and the record."""


class UsageError(PolymodalError, ValueError):
    """A bad argument to a command or an API call; the message names the argument."""


class UnsupportedTaskError(PolymodalError, ValueError):
    """The model cannot do the task asked of it; the message names the tasks it can do."""


class DestinationExistsError(PolymodalError, FileExistsError):
    """A destination that holds files polymodal did not write (or a run it must not replace)."""


class TrainingStopped(PolymodalError):
    """A training run that stopped before its last step (interrupted, or a non-finite loss).

    step: the last completed optimizer step; checkpoint: the folder saved for it, if any.
    """

    def __init__(self, message: str, step: int = 0, checkpoint=None) -> None:
        super().__init__(message)
        self.step = step
        self.checkpoint = checkpoint

"""The errors a user can act on, and how every command line reports them: one line, a non-zero
exit, no traceback (a traceback is kept for everything else: those are bugs to report).

    UserError                      something the user can fix or decide
      InputError (ValueError)      a setting, file or folder that does not fit; raised before any long work
        ConfigError, DataError     (training.config, training.data)
      RunError (RuntimeError)      a run that cannot go on: a damaged checkpoint, an output_dir in
                                   use, a full disk, a diverged loss
      Stopped                      a run stopped on a signal, after saving what it could
"""

from __future__ import annotations

import errno
import sys
from contextlib import contextmanager
from typing import Iterator


class UserError(Exception):
    exit_code = 1


class InputError(UserError, ValueError):
    """A setting, file or folder that does not fit what is asked of it."""


class RunError(UserError, RuntimeError):
    """A run that cannot go on, for a reason the user can act on."""


class Stopped(UserError):
    """A run stopped on a signal; its exit code is 128 + the signal's number, as a shell reports it."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum, self.exit_code = signum, 128 + signum


# what the user can fix when a write or read fails
IO_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT, errno.EISDIR, errno.ENOTDIR}


@contextmanager
def one_line_errors(input_exit_code: int = 1) -> Iterator[None]:
    """Around a command's work: a UserError, or an OSError of a path (no space, read-only,
    permission, missing), ends the command with ``error: ...`` on one line."""
    try:
        yield
    except Stopped as err:
        _say(str(err))
        raise SystemExit(err.exit_code) from None
    except UserError as err:
        _say(f"error: {err}")
        raise SystemExit(input_exit_code if isinstance(err, InputError) else err.exit_code) from None
    except OSError as err:
        if err.errno not in IO_ERRNOS or not err.filename:
            raise
        _say(f"error: {err.strerror}: {err.filename}")
        raise SystemExit(1) from None


def _say(line: str) -> None:
    """One line to stderr in one write, so that the lines of several processes never interleave."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()

"""One exception type for every user-facing failure: its message is one line that names the fix."""


class OffloadError(Exception):
    """Bad input or an impossible plan. The CLI prints `str(err)` and exits non-zero, no traceback."""

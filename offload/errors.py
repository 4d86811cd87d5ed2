"""One exception type for every user-facing failure: its message is one line that names the fix.

Messages name options as the Python API spells them, in one form: `store_dir=PATH`, `store='disk'`,
`cache_memory=1.5MiB`; the command-line tools rewrite exactly that form into their flags
(`offload.cli.common.FLAGS`), so one message serves both. Sizes are written in KiB/MiB/GiB.
"""


class OffloadError(Exception):
    """Bad input or an impossible plan. The CLI prints `str(err)` and exits non-zero, no traceback."""

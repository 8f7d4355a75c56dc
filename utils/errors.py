"""The one exception type for mistakes a user can fix (bad flag, missing file, bad data).

Scripts catch it in `utils.cli.run_cli` and print one clear line instead of a traceback.
"""


class UsageError(Exception):
    """A user error: the message names the flag or file and says what to do."""

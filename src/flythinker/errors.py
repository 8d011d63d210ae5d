"""The one exception type users see for bad input.

Everything a user can get wrong (a path, a config value, a data record, a model name) raises
`FlyThinkerError` with a message that names the problem and, where there is one, the fix. The CLI
prints such errors as one line and exits non-zero; anything else is a bug and keeps its traceback.
"""


class FlyThinkerError(ValueError):
    """Bad input, explained in one line."""

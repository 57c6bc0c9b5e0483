"""One exception type for everything a user can get wrong.

Its message is a single line that names the file, field or argument at
fault and says what to do; the CLI prints it as `error: <message>`.
"""


class SolError(Exception):
    """A problem the user can fix: bad file, bad argument, missing piece."""

"""The one exception type fpbench raises for problems a user can fix."""


class FpbenchError(Exception):
    """A bad input or a missing resource. The message names the problem and the fix;
    the CLI prints it on one line and exits non-zero."""

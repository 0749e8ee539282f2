"""Errors that the CLI turns into one clear line and exit status 2."""


class DcclError(Exception):
    """A user-facing error: bad input, a missing file, an invalid config value.

    The message must name what is wrong (the file, the field, the value). The CLI
    prints it as one line, without a traceback, and exits with status 2.
    """

    exit_code = 2

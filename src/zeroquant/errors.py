"""The one exception type users see; the CLI turns it into a one-line message and exit code 2."""


class ZeroQuantError(Exception):
    pass

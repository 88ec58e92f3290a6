"""The exceptions users see; the CLI turns each into a one-line message and exit code 2."""


class ZeroQuantError(ValueError):
    """An error the user can cause and fix: a bad option, config, input or file. Most are bad values, so it is a
    ValueError; code that catches ZeroQuantError catches every error of the package's own making."""


class PathError(ZeroQuantError, OSError):
    """A path that cannot be used as asked: missing, not a directory, not writable, the disk full."""

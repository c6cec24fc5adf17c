"""The mark of an expected failure.

An error a user can act on (a damaged checkpoint, a diverged run, a condition nobody set, a bad
flag) derives from :class:`DiffloraError` besides its usual base (``RuntimeError``,
``LookupError``, ...), so the command line can print it as one line without importing the
module that raises it. Bad values are ``ValueError`` and missing files ``OSError``, as usual.
"""

import errno

__all__ = ["DiffloraError", "describe_os_error"]


class DiffloraError(Exception):
    """An expected failure with a message that names the problem and the fix (CLI: exit code 2)."""


# What to do about an operating system's refusal, by its errno: the fix half of the one line.
_OS_FIXES = {
    errno.ENOENT: "no such file or directory (does its directory exist?): create it or choose another path",
    errno.EACCES: "permission denied: fix its permissions or choose another path",
    errno.EPERM: "not permitted: fix its permissions or choose another path",
    errno.EROFS: "the file system is read-only: choose another path",
    errno.EEXIST: "a file is in the way of a directory there: remove it or choose another path",
    errno.EISDIR: "it is a directory: name a file",
    errno.ENOTDIR: "a part of the path is a file, not a directory: choose another path",
    errno.ENOSPC: "no space left on the device: free some space or choose another path",
    errno.EIO: "input/output error: not a regular file, or the device failed; choose another path",
}


def describe_os_error(exc: OSError) -> str:
    """A raw OSError (``[Errno 2] No such file or directory: 'x.png.tmp'``) as one line naming the
    path the user gave (not the temporary file written first) and the fix. An OSError difflora
    raised with its own message (a DiffloraError, or no errno) keeps it."""
    if isinstance(exc, DiffloraError) or exc.errno is None or exc.strerror is None:
        return str(exc)
    path = exc.filename2 if exc.errno == errno.EISDIR and exc.filename2 is not None else exc.filename
    where = str(path).removesuffix(".tmp") if path is not None else "a file"
    fix = _OS_FIXES.get(exc.errno, f"{exc.strerror.lower()}: choose another path")
    return f"cannot use {where}: {fix}"

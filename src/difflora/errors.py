"""The mark of an expected failure.

An error a user can act on (a damaged checkpoint, a diverged run, a condition nobody set, a bad
flag) derives from :class:`DiffloraError` besides its usual base (``RuntimeError``,
``LookupError``, ...), so the command line can print it as one line without importing the
module that raises it. Bad values are ``ValueError`` and missing files ``OSError``, as usual.
"""

__all__ = ["DiffloraError"]


class DiffloraError(Exception):
    """An expected failure with a message that names the problem and the fix (CLI: exit code 2)."""

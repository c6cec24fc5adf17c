"""Reading a JSON file a user may have damaged, with one-line errors that name the file, the problem and the fix.

Every JSON file difflora reads back (a run's ``config.json``, a checkpoint's ``state.json``, an
adapter's or a peft adapter's ``adapter_config.json``, a feature network's description, the runs
table's records) goes through :func:`read_json_file`, so a missing, truncated, binary or
wrongly shaped file fails the same way everywhere: one line, in the caller's exception type,
with the caller's advice on how to repair it. JSON is UTF-8 (RFC 8259), whatever the locale.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["read_json_file"]

# The JSON name of each top-level type a caller may require (the Python type json.loads returns).
_JSON_NAMES: dict[type, str] = {dict: "object", list: "array"}


def _json_kind(value: Any) -> str:
    """The JSON name of what ``value`` holds: 'an array', 'a string', 'null', ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an " + _JSON_NAMES[type(value)]


def read_json_file(
    path: str | Path,
    *,
    fix: str,
    error: type[Exception] = ValueError,
    expect: type[dict] | type[list] | None = None,
    what: str | None = None,
    missing: str | None = None,
) -> Any:
    """The parsed content of the JSON file ``path``; any problem with it raises ``error`` (one line).

    ``fix`` says how to repair a damaged file (it ends every message but ``missing``). ``expect``
    (``dict`` or ``list``) is the top-level type the file must hold. ``what`` is how messages name
    the file (default: its path). ``missing`` is the whole message for a file that does not exist
    (default: ``"{what} does not exist; {fix}"``): what an absent file means differs by caller.

    The messages: ``{what} does not exist``, ``{what} is not valid JSON (not UTF-8 text: byte 0x89
    at offset 0)``, ``{what} is not valid JSON (Expecting value: line 1 column 1 (char 0))``,
    ``{what} is not a JSON object (it holds an array)``, each followed by ``; {fix}``.
    """
    path = Path(path)
    what = str(path) if what is None else what
    if not path.is_file():
        raise error(missing or f"{what} does not exist; {fix}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = raw[exc.start]
        raise error(
            f"{what} is not valid JSON (not UTF-8 text: byte 0x{bad:02x} at offset {exc.start}); {fix}"
        ) from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{what} is not valid JSON ({exc}); {fix}") from None
    except RecursionError:  # a forged file of thousands of nested brackets
        raise error(f"{what} is not valid JSON (nested too deeply to read); {fix}") from None
    if expect is not None and not isinstance(value, expect):
        raise error(f"{what} is not a JSON {_JSON_NAMES[expect]} (it holds {_json_kind(value)}); {fix}")
    return value

"""What every config key means: the resolved YAML with defaults, one key explained, the JSON schema.

Each field's one-line description is the docstring under it in its section module, read from
the source when asked (:func:`descriptions`; not at import, which every command would pay): one
source for ``difflora config --explain KEY`` and the JSON schema (``difflora config --schema``)::

    >>> print(explain_key("train.lr"))
    train.lr: number > 0, default 0.0001
      Peak learning rate (AdamW).
"""

from __future__ import annotations

import ast
import difflib
import functools
import inspect
import itertools
import json
import math
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined, to_jsonable_python

from difflora.config.base import ConfigError
from difflora.config.schema import Config

__all__ = ["descriptions", "explain_key", "json_schema", "resolved_yaml", "sections"]

_BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("min_length", "of length >="))


def sections() -> list[type[BaseModel]]:
    """Every section class of the config tree, Config first (each once)."""
    found: list[type[BaseModel]] = [Config]
    for model in found:  # grows while walked: breadth first
        for field in model.model_fields.values():
            section = _section(field.annotation)
            if section is not None and section not in found:
                found.append(section)
    return found


def _field_docstrings(node: ast.ClassDef) -> dict[str, str]:
    """{field: the string statement right under its annotated assignment} of a class's body."""
    found = {}
    for stmt, nxt in itertools.pairwise(node.body):
        doc = nxt.value.value if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) else None
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(doc, str):
            found[stmt.target.id] = " ".join(doc.split())
    return found


@functools.cache
def descriptions() -> dict[type[BaseModel], dict[str, str]]:
    """{section class: {field: the docstring under it}}, read from the section modules' source."""
    by_file: dict[Path, list[type[BaseModel]]] = {}
    for model in sections():
        by_file.setdefault(Path(inspect.getfile(sys.modules[model.__module__])), []).append(model)
    found: dict[type[BaseModel], dict[str, str]] = {}
    for path, models in by_file.items():
        classes = {n.name: n for n in ast.parse(path.read_text(encoding="utf-8")).body if isinstance(n, ast.ClassDef)}
        for model in models:
            found[model] = _field_docstrings(classes[model.__name__])
    return found


def _description(model: type[BaseModel], name: str) -> str:
    return descriptions()[model].get(name, "")


def json_schema() -> dict[str, Any]:
    """The JSON schema of a config file (draft 2020-12), every key with its description and default."""
    schema = Config.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "difflora config"
    for model in sections():
        node = schema if model is Config else schema["$defs"][model.__name__]
        for name, prop in node["properties"].items():
            prop["description"] = _description(model, name)
    return schema


def _section(annotation: Any) -> type[BaseModel] | None:
    """The config section a field holds (``X``, ``X | None``, ``list[X]``), None for a value."""
    for arg in (annotation, *typing.get_args(annotation)):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _is_list(annotation: Any) -> bool:
    return typing.get_origin(annotation) is list


def _scalar(value: Any) -> str:
    """A value as YAML flow text (``0.0001``, ``[16, 8]``, ``null``, ``{}``)."""
    return yaml.safe_dump([to_jsonable_python(value)], default_flow_style=True, width=math.inf).strip()[1:-1]


def _type_name(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin in (list, tuple, dict):
        inner = ", ".join(_type_name(a) for a in args if a is not Ellipsis)
        return f"{origin.__name__} of {inner}" if inner else origin.__name__
    names = {int: "integer", float: "number", str: "string", bool: "true/false", type(None): "null"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _bounds(field: FieldInfo) -> str:
    found = []
    for meta in field.metadata:
        for attr, sign in _BOUNDS:
            value = getattr(meta, attr, None)
            found += [f"{sign} {value}"] if value is not None else []
    return " " + " ".join(found) if found else ""


def _default(field: FieldInfo) -> str:
    default = field.get_default(call_default_factory=True)
    return "required" if default is PydanticUndefined else f"default {_scalar(default)}"


def _resolve(key: str) -> tuple[FieldInfo | None, type[BaseModel]]:
    """(the field ``key`` names, or None for the whole config; the section holding it). A part that is
    an integer indexes a list (``model.adapters.0.rank``); a list's entries share their keys."""
    model: type[BaseModel] = Config
    field: FieldInfo | None = None
    parts = [p for p in key.split(".") if p] if key else []
    for i, part in enumerate(parts):
        if part.isdigit() and field is not None and _is_list(field.annotation):
            continue
        section = _section(field.annotation) if field is not None else model
        if section is None:
            raise ConfigError(f"{'.'.join(parts[:i])} is a value, not a section: explain {'.'.join(parts[:i])}")
        fields = section.model_fields
        if part not in fields:
            close = difflib.get_close_matches(part, list(fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            where = ".".join(parts[:i]) or "the config"
            raise ConfigError(f"{key}: unknown key{hint}; the keys of {where}: {', '.join(fields)}")
        model, field = section, fields[part]
    return field, model


def explain_key(key: str, cfg: Config | None = None) -> str:
    """``key``'s type, bounds, default and description (``cfg``: also its value there); a section
    (``train``, ``model.adapters``, or "" for the whole config) lists its keys with theirs."""
    field, owner = _resolve(key)
    section = Config if field is None else _section(field.annotation)
    lines = []
    if field is not None:
        kind = "a list of sections" if _is_list(field.annotation) else "a section"
        kind = f"{_type_name(field.annotation)}{_bounds(field)}, {_default(field)}" if section is None else kind
        lines += [f"{key}: {kind}", f"  {_description(owner, key.split('.')[-1])}"]
    if cfg is not None and key and section is None:
        lines.append(f"  in this config: {_scalar(_value_at(cfg, key))}")
    if section is not None:
        lines.append("keys:" if field is None else "  keys:")
        pad = "  " if field is None else "    "
        for name in section.model_fields:
            lines.append(f"{pad}{name}: {_description(section, name)}")
    return "\n".join(lines)


def _value_at(cfg: Config, key: str) -> Any:
    node: Any = cfg
    parts = key.split(".")
    for i, part in enumerate(parts):
        if node is None:  # an optional section this config leaves unset: so is every key in it
            raise ConfigError(f"{key}: {'.'.join(parts[:i])} is not set in this config (explain {key} without CONFIG)")
        if isinstance(node, list):
            if int(part) >= len(node):
                raise ConfigError(f"{key}: the list has {len(node)} entries in this config")
            node = node[int(part)]
        else:
            node = getattr(node, part)
    return node


def _emit(node: BaseModel, indent: str, lines: list[str]) -> None:
    """The keys of ``node`` as YAML lines: a value unlike its default carries ``# default: ...``."""
    for name, field in type(node).model_fields.items():
        value = getattr(node, name)
        default = field.get_default(call_default_factory=True)
        note = "" if default is PydanticUndefined or _same(value, default) else f"  # default: {_scalar(default)}"
        if isinstance(value, BaseModel):  # its keys carry their own notes; an optional section's default is null
            lines.append(f"{indent}{name}:{note if default is None else ''}")
            _emit(value, indent + "  ", lines)
        elif isinstance(value, list) and value and all(isinstance(v, BaseModel) for v in value):
            lines.append(f"{indent}{name}:{note}")
            for item in value:
                sub: list[str] = []
                _emit(item, indent + "    ", sub)
                lines += [f"{indent}  - {sub[0].lstrip()}", *sub[1:]]
        else:
            lines.append(f"{indent}{name}: {_scalar(value)}{note}")


def _same(value: Any, default: Any) -> bool:
    return json.dumps(to_jsonable_python(value)) == json.dumps(to_jsonable_python(default))


def resolved_yaml(cfg: Config) -> str:
    """``cfg`` as YAML with every key (the defaults filled in), each value that is not its key's
    default followed by ``# default: ...``; it loads back to the same config."""
    lines: list[str] = []
    _emit(cfg, "", lines)
    return "\n".join(lines) + "\n"

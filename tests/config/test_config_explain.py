"""`difflora config` (issue 32, item 12): every config field carries a one-line description (the
docstring under it), shown by --explain and in the JSON schema; the schema validates every shipped
preset; the resolved YAML lists every key and loads back to the same config."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import yaml

from difflora.cli.commands import main
from difflora.config.explain import descriptions, explain_key, json_schema, resolved_yaml, sections
from difflora.config.schema import Config, ConfigError, config_to_dict, load_config, parse_config
from difflora.presets import CONFIGS_DIR


def test_every_field_has_a_one_line_description():
    missing = []
    found = descriptions()
    for model in sections():
        for name in model.model_fields:
            d = found[model].get(name)
            if not d or not d.endswith(".") or len(d) > 160:
                missing.append(f"{model.__name__}.{name}: {d!r}")
    assert not missing, "fields without a one-line description (a docstring under the field):\n" + "\n".join(missing)
    assert len(sections()) == 17 and sum(len(m.model_fields) for m in sections()) > 150
    # Read from the source lines under the fields, not from anything set at import.
    assert found[type(Config().train)]["lr"] == "Peak learning rate (AdamW)."
    assert Config.model_fields["train"].description is None


def _check(schema: dict, node: dict, value, where: str) -> list[str]:
    """The problems of ``value`` against the JSON schema ``node`` (the keywords pydantic emits)."""
    if "$ref" in node:
        return _check(schema, schema["$defs"][node["$ref"].split("/")[-1]], value, where)
    if "anyOf" in node:
        tries = [_check(schema, n, value, where) for n in node["anyOf"]]
        return [] if any(not t for t in tries) else [f"{where}: matches no alternative ({tries})"]
    problems = []
    kinds = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}
    t = node.get("type")
    if t == "integer" and not (isinstance(value, int) and not isinstance(value, bool)):
        return [f"{where}: {value!r} is not an integer"]
    if t == "number" and not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)):
        return [f"{where}: {value!r} is not a number"]
    if t in kinds and not isinstance(value, kinds[t]):
        return [f"{where}: {value!r} is not of type {t}"]
    if "enum" in node and value not in node["enum"]:
        problems.append(f"{where}: {value!r} not in {node['enum']}")
    for key, ok in (
        ("minimum", lambda b: value >= b),
        ("maximum", lambda b: value <= b),
        ("exclusiveMinimum", lambda b: value > b),
        ("exclusiveMaximum", lambda b: value < b),
        ("minItems", lambda b: len(value) >= b),
        ("maxItems", lambda b: len(value) <= b),
        ("pattern", lambda b: re.search(b, value)),
    ):
        if key in node and not ok(node[key]):
            problems.append(f"{where}: {value!r} fails {key} {node[key]}")
    if isinstance(value, dict):
        props = node.get("properties", {})
        problems += [f"{where}.{k}: missing" for k in node.get("required", []) if k not in value]
        for k, v in value.items():
            if k in props:
                problems += _check(schema, props[k], v, f"{where}.{k}")
            elif node.get("additionalProperties") is False:
                problems.append(f"{where}.{k}: not allowed")
    if isinstance(value, list):
        items = node.get("prefixItems")
        for i, v in enumerate(value):
            sub = items[i] if items is not None and i < len(items) else node.get("items", {})
            problems += _check(schema, sub, v, f"{where}.{i}")
    return problems


def test_the_schema_holds_every_description_and_validates_the_shipped_presets():
    schema = json_schema()
    for name, d in [("Config", schema), *schema["$defs"].items()]:
        for key, prop in d["properties"].items():
            assert prop.get("description", "").endswith("."), f"{name}.{key}"
    assert schema["$defs"]["TrainConfig"]["properties"]["lr"]["description"] == "Peak learning rate (AdamW)."
    presets = sorted(Path(CONFIGS_DIR).rglob("*.yaml"))
    assert len(presets) > 20
    for path in presets:
        tree = yaml.safe_load(path.read_text()) or {}
        assert _check(schema, schema, tree, path.name) == [], path
    # ... and refuses what the config refuses (the validator is no yes-man).
    for bad in ({"train": {"lr": -1}}, {"train": {"lrr": 1}}, {"model": {"arch": "resnet"}}, {"sample": {"num": 1.5}}):
        assert _check(schema, schema, bad, "bad"), bad
        with pytest.raises(ConfigError):
            parse_config(bad)


@pytest.mark.parametrize("preset", ["digits", "tiny-unet", "tiny-dit"])
def test_the_resolved_yaml_lists_every_key_and_loads_back_to_the_same_config(preset):
    cfg = load_config(CONFIGS_DIR / f"{preset}.yaml", ["train.lr=2e-4"])
    text = resolved_yaml(cfg)
    assert config_to_dict(parse_config(yaml.safe_load(text))) == config_to_dict(cfg)
    # Every key of every present section is a line; a value off its default says the default.
    keys = sum(len(m.model_fields) for m in (Config, type(cfg.train), type(cfg.sample), type(cfg.diffusion)))
    assert len(text.splitlines()) > keys
    assert "  lr: 0.0002  # default: 0.0001\n" in text and "  weight_decay: 0.0\n" in text


def test_explain_names_type_default_description_and_the_value_in_a_config(capsys):
    assert explain_key("train.lr") == "train.lr: number > 0, default 0.0001\n  Peak learning rate (AdamW)."
    cfg = load_config(
        CONFIGS_DIR / "digits.yaml",
        ["model.adapters=[{name: c, condition: y, weighting: index, num_values: 10, rank: 8}]"],
    )
    text = explain_key("model.adapters.0.rank", cfg)
    assert text.startswith("model.adapters.0.rank: integer >= 1, default 4\n  Rank of the low-rank update")
    assert text.endswith("in this config: 8")
    assert explain_key("model.adapters").startswith("model.adapters: a list of sections\n")
    assert "  keys:\n    name: The adapter's name" in explain_key("model.adapters")
    assert main(["config", "--explain", "sample.sampler"]) == 0
    assert capsys.readouterr().out == "sample.sampler: one of ddpm, ddim, default ddim\n  ddpm (ancestral) or ddim.\n"


def test_the_cli_prints_or_writes_the_resolved_config_and_the_schema(tmp_path, capsys):
    assert main(["config", "tiny-unet", "--set", "train.steps=7"]) == 0
    printed = capsys.readouterr().out
    assert yaml.safe_load(printed)["train"]["steps"] == 7
    assert main(["config", "--schema", "--out", str(tmp_path / "s.json")]) == 0
    assert json.loads((tmp_path / "s.json").read_text()) == json_schema()
    assert capsys.readouterr().out == f"wrote {tmp_path / 's.json'}\n"

"""Typed YAML configuration: parse, validate with a pydantic model, and report errors
that name the file, the line and the field. Policies, fleets and GPU profile tables
all load through `parse_yaml_model`."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


def line_of(node: yaml.Node | None, loc: tuple) -> int | None:
    """Walk the YAML node tree along a field location to find its line (1-based)."""
    line = None
    for key in loc:
        if node is None:
            break
        line = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            nxt = None
            for k, v in node.value:
                if k.value == key:
                    line, nxt = k.start_mark.line + 1, v
                    break
            node = nxt
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            break
    return line


def field_error(source: str, node: yaml.Node | None, loc: tuple, msg: str) -> str:
    """`source:line: field 'a.b': msg` (the line left out when the field has none)."""
    line = line_of(node, loc)
    where = f"{source}:{line}" if line else source
    return f"{where}: field '{'.'.join(str(p) for p in loc) or '<root>'}': {msg}"


def read_config(path: str | Path, error: type[Exception], what: str) -> str:
    """The text of a config file; an unreadable file raises `error` naming it."""
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise error(f"{path}: cannot read {what}: {exc.strerror}") from None


def parse_yaml_model(text: str, model: type[M], source: str, error: type[Exception],
                     what: str = "the file") -> tuple[M, yaml.Node | None]:
    """Validate YAML text into `model`; raises `error` naming source, line and field.
    Returns the model and the YAML node tree (for later cross-field errors)."""
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise error(f"{source}:{mark.line + 1 if mark else 1}: invalid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise error(f"{source}:1: {what} must be a mapping, got {type(data).__name__}")
    try:
        return model.model_validate(data), node
    except ValidationError as exc:
        msgs = [field_error(source, node, tuple(err["loc"]), err["msg"]) for err in exc.errors()]
        raise error("\n".join(msgs)) from None

"""Top-level field checks of a JSON object: what is missing or of the wrong JSON type.

Pure: the problems come back as ``(loc, msg)`` pairs, which the handlers in ``api/`` answer
as 422 ``validation_error`` (its ``detail`` list)."""

from __future__ import annotations

from typing import Any

Problem = tuple[list[Any], str]

_TYPE_NAMES = {str: "a string", dict: "an object", list: "a list", bool: "a boolean", int: "an integer"}


def field_problems(data: dict[str, Any], spec: dict[str, tuple[type, bool]]) -> list[Problem]:
    """Every problem with the fields ``spec`` names (name -> (type, required)), in its
    order. ``None`` passes for optional fields; ``bool`` is never an int."""
    problems: list[Problem] = []
    for name, (kind, required) in spec.items():
        value = data.get(name)
        if value is None:
            if required:
                problems.append((["body", name], "field required"))
            continue
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            problems.append((["body", name], f"must be {_TYPE_NAMES.get(kind, kind.__name__)}"))
    return problems

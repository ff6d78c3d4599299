"""Configuration errors in a user's words: one line per validation error, naming where the value
came from (file, variable, flag or Prefect profile), the key and what is expected."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, ValidationError

from flowhand.backends import section_names


def model_sections(model: type[BaseModel]) -> dict[str, type[BaseModel]]:
    """The tables of `model`: its fields whose type is itself a model (`[api]`, `[shutdown]`)."""
    out: dict[str, type[BaseModel]] = {}
    for key, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out[key] = ann
    return out


def validation_problems(
    exc: ValidationError,
    origins: Mapping[tuple[str, ...], str],
    path: Path | None,
    model: type[BaseModel],
    prefix: tuple[str, ...] = (),
) -> list[str]:
    """One line per error of validating `model` (at `prefix`), naming origin, key and what is
    expected."""
    problems = []
    for err in exc.errors():
        loc = prefix + tuple(str(p) for p in err["loc"])
        key = ".".join(loc)
        origin = origins.get(loc) or origins.get(loc[:1]) or (str(path) if path else "defaults")
        if err["type"] == "extra_forbidden":
            problems.append(f"{origin}: unknown key '{key}' "
                            f"(allowed here: {_allowed(model, loc, prefix)})")
        else:
            problems.append(
                f"{origin}: key '{key}': {err['msg']} (got {err.get('input')!r})"
                if "input" in err and err["type"] != "missing"
                else f"{origin}: key '{key}': {err['msg']}"
            )
    return problems


def _allowed(model: type[BaseModel], loc: tuple[str, ...], prefix: tuple[str, ...]) -> str:
    """The keys allowed where an unknown one was found: a table's, or the top level's and the
    backends' tables."""
    where, tables = model, []
    sections = model_sections(model)
    if not prefix and len(loc) > 1 and loc[0] in sections:
        where = sections[loc[0]]
    elif not prefix:
        tables = section_names()
    return ", ".join(sorted([*where.model_fields, *tables]))

"""The base of every config section, and the one-line rendering of a validation error.

Every section forbids unknown keys (a typo is an error, not a silently ignored setting) and is
frozen. A section that constrains, or is constrained by, the rest of the run overrides
`Section.check_in`; `RunConfig` calls the checks in a fixed order once every section is valid
on its own.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING, get_args

from pydantic import BaseModel, ConfigDict, ValidationError

if TYPE_CHECKING:
    from veil.config.run import RunConfig


class Section(BaseModel):
    """A table of the run config: unknown keys are refused, values cannot change."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def check_in(self, run: RunConfig) -> None:
        """Raise `ValueError` (one line: what is wrong and what to change) when this section's
        settings cannot work with the rest of `run`; the default accepts any run."""


def above_limit(limit: int, what: str, reason: str) -> ValueError:
    """The refusal of a value above its upper limit, naming the limit and why it exists
    (`one_line` puts the key and the value in front of it)."""
    return ValueError(f"above the limit of {limit:,} {what}; {reason}")


def one_line(exc: ValidationError, root: type[BaseModel], tags: Collection[str] = ()) -> str:
    """The first validation error as `key = value: what is wrong` (and how many more there are).

    `root` is the model that was validated (for the allowed keys of an unknown key's table);
    `tags` are the discriminator values of tagged unions, which pydantic puts in an error's
    location and which the message leaves out (`strategy.mu`, not `strategy.fedprox.mu`).
    """
    errors = exc.errors(include_url=False)
    first = errors[0]
    loc = [str(part) for part in first["loc"] if str(part) not in tags]
    key = ".".join(loc)
    kind = first["type"]
    if kind == "extra_forbidden":
        allowed = allowed_keys(root, loc[:-1])
        where = f"[{'.'.join(loc[:-1])}]" if len(loc) > 1 else "the top level"
        msg = f"unknown key '{key}' in {where}"
        if allowed:
            msg += f"; allowed keys: {', '.join(allowed)}"
    elif kind == "union_tag_invalid":
        tags_allowed = first.get("ctx", {}).get("expected_tags", "")
        msg = f"{key}.name = {first.get('ctx', {}).get('tag')!r}: use one of {tags_allowed}"
    elif kind == "missing":
        msg = f"missing required key '{key}'"
    else:
        reason = first["msg"].removeprefix("Value error, ")
        value = first.get("input")
        if key and not isinstance(value, dict | list):
            msg = f"{key} = {value!r}: {reason}"
        elif key:
            msg = f"{key}: {reason}"
        else:
            msg = reason
    if len(errors) > 1:
        msg += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return msg


def allowed_keys(root: type[BaseModel], loc: list[str]) -> list[str]:
    """The keys of the table at `loc` under `root`, sorted; [] when `loc` is not one table."""
    model = root
    for part in loc:
        field = model.model_fields.get(part)
        annotation = field.annotation if field else None
        # An optional section (`X | None`) lists the keys of X.
        options = [a for a in get_args(annotation) if a is not type(None)]
        if len(options) == 1:
            annotation = options[0]
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            return []
    return sorted(model.model_fields)

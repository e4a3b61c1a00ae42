"""What every model config shares: named presets, a dict round trip, and checked fields.

A model's config is a dataclass deriving from `ModelConfig`, with its presets in `PRESETS`
(name → the fields that differ from the defaults). `from_preset(name, **overrides)` builds one,
`to_dict` / `from_dict` round-trip it through JSON (`model_config.json` in a run directory), and
every field is checked against its annotation when the config is made, so a `config.json` that
says `"d_model": "64"` or `"n_layers": [2]` is refused with a message naming the field, not
turned into a tensor-shape error three calls later. Each model adds its own rules in `validate`.
"""

import math
import types
import typing
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

from fromscratch.errors import UserError


@dataclass
class ModelConfig:
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}

    def __post_init__(self):
        for f in fields(self):
            setattr(self, f.name, _checked(f.name, getattr(self, f.name), _field_types(type(self))[f.name]))
        self.validate()

    def validate(self) -> None:
        """Rules between fields (e.g. d_model divisible by n_heads); raise UserError."""

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelConfig":
        if name not in cls.PRESETS:
            model = cls.__name__.removesuffix("Config")
            raise UserError(f"unknown {model} preset {name!r}; presets: {', '.join(cls.PRESETS)}")
        return cls.from_dict({**cls.PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict, source: str | None = None) -> "ModelConfig":
        """The config with these fields (the rest at their defaults). `source` names where the
        values came from (a file) in any complaint about them."""
        where = f"{source}: " if source else ""
        if not isinstance(values, dict):
            raise UserError(f"{where}a {cls.__name__} must be a JSON object, not {type(values).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"{where}unknown {cls.__name__} field(s) {', '.join(unknown)}; "
                            f"known: {', '.join(sorted(known))}")
        try:
            return cls(**values)
        except UserError as e:
            raise UserError(f"{where}{e}") from None


_TYPE_CACHE: dict[type, dict[str, Any]] = {}


def _field_types(cls: type) -> dict[str, Any]:
    if cls not in _TYPE_CACHE:
        _TYPE_CACHE[cls] = typing.get_type_hints(cls)
    return _TYPE_CACHE[cls]


def _checked(name: str, value, annotation):
    """`value` if it is of the annotated type (an int for a float field becomes a float); else
    UserError naming the field."""
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) or \
        typing.get_origin(annotation) is typing.Union else (annotation,)
    if value is None and type(None) in options:
        return None
    for expected in options:
        if expected is bool and isinstance(value, bool):
            return value
        if expected is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if expected is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise UserError(f"{name} must be a finite number, got {value}")
            return float(value)
        if expected is str and isinstance(value, str):
            return value
        if typing.get_origin(expected) in (tuple, list) and isinstance(value, (tuple, list)):
            return typing.get_origin(expected)(value)
        if expected in (dict, list) and isinstance(value, expected):
            return value
    wanted = " or ".join("null" if t is type(None) else getattr(t, "__name__", str(t)) for t in options)
    raise UserError(f"{name} must be {wanted}, got {value!r} ({type(value).__name__})")


_REQUIRED = object()


def json_field(values: dict, key: str, annotation, source: str, default=_REQUIRED):
    """`values[key]` (or `default` when absent) checked against `annotation` (int, float, bool,
    str, or a union with None): for reading foreign configs, whose keys have other names than
    ours, so that a complaint names the key as the file spells it."""
    if key not in values:
        if default is _REQUIRED:
            raise UserError(f"{source}: has no {key!r}")
        return default
    try:
        return _checked(key, values[key], annotation)
    except UserError as e:
        raise UserError(f"{source}: {e}") from None

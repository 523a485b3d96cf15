"""One declaration per setting: a config field says everything the CLI, resume and help need.

Every field of a stage's config dataclass (hierdctl/configs.py) is declared with
`setting(...)`: its default, its help text, its role, and how the command line spells it
when that is not `--field-name`. From that single declaration come

- the command's options (hierdctl/cli.py builds every command from its config class; the
  help shows the field's default, never a restated literal),
- `identity(cfg)`: the settings that decide what an output holds (a cache's
  cache-config.json; a run must match them to resume), with the key each one has there,
- `keys(cls, role)`: the role sets (distill's resume check and its resolved config),
- `from_values(cls, values)`: a config from the CLI's parsed options (nested option
  groups such as SourceOptions are flattened on the command line).

Roles (tests/test_settings.py fails on a field without one):

    identity  decides the output's content; recorded with it; a resume must match it
    recorded  recorded with the output, free to change at a resume (where the images are
              read from, how often checkpoints and log rows are written)
    runtime   how this process runs (device, workers, batch of a forward, progress,
              --overwrite/--resume); never recorded, may change at a resume

Pure Python (no torch, numpy): `hierdctl --help` imports it.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, Callable

IDENTITY, RECORDED, RUNTIME = "identity", "recorded", "runtime"
ROLES = (IDENTITY, RECORDED, RUNTIME)
OMIT = object()  # `otherwise=OMIT`: a setting whose `when` is false leaves no key in the identity


@dataclass(frozen=True)
class Cli:
    """How the command line spells one setting.

    kind      option | argument | group (a nested config whose fields are options of their
              own) | none (not on the command line: set through another option's `spread`)
    flags     the option's spellings when not --field-name (the first is the main one; a
              renamed flag keeps its old name here); "--x/--no-x" for a two-way switch
    type      what the command line parses when it is not the field's type (str for "lo,hi")
    parse     (value, flag) -> the field's value; raise UserError naming the flag
    spread    parse returns {field: value} for several fields (--teacher A --teacher B)
    show      default -> the text the option takes as its default (and --help shows)
    required  must be given (typer's `...`); fields without a default are required anyway
    """

    kind: str = "option"
    flags: tuple[str, ...] = ()
    type: Any = None
    parse: Callable | None = None
    spread: bool = False
    show: Callable | None = None
    required: bool = False
    metavar: str | None = None


def setting(default=MISSING, *, help: str, role: str, factory=MISSING, key: str | None = None,
            when: Callable | None = None, otherwise=OMIT, cli: Cli | None = None, **cli_kw) -> Any:
    """A dataclass field with its declaration. `key`: its dotted path in identity() when that is
    not its name; `when(cfg)`: it enters identity() only when true (else `otherwise` stands at
    the path's first key, or nothing with OMIT). Keyword arguments other than these build `cli`."""
    assert role in ROLES, role
    meta = {"help": help, "role": role, "key": key, "when": when, "otherwise": otherwise,
            "cli": cli or Cli(**cli_kw)}
    if factory is not MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def fields(cls) -> list[dataclasses.Field]:
    return list(dataclasses.fields(cls))


def meta(f: dataclasses.Field) -> dict:
    return f.metadata


def default(cls, name: str):
    """The default of field `name` of dataclass `cls`."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return MISSING


def field_types(cls) -> dict[str, Any]:
    """Each field's resolved type (the annotations are strings under `from __future__`)."""
    return typing.get_type_hints(cls)


def group_class(cls, f: dataclasses.Field):
    """The dataclass of a `kind="group"` field."""
    t = field_types(cls)[f.name]
    assert dataclasses.is_dataclass(t), (cls, f.name, t)
    return t


def keys(cls, role: str) -> tuple[str, ...]:
    """The names of `cls`'s top-level fields with `role`."""
    return tuple(f.name for f in fields(cls) if f.metadata["role"] == role)


def _jsonable(v):
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    if dataclasses.is_dataclass(v):
        return {f.name: _jsonable(getattr(v, f.name)) for f in fields(type(v))}
    return v


def _put(d: dict, path: str, value) -> None:
    *parents, last = path.split(".")
    for p in parents:
        d = d.setdefault(p, {})
    d[last] = value


def identity(cfg) -> dict:
    """Every identity setting of `cfg` under its key (nested groups under the group's key),
    plus the class's IDENTITY_CONSTANTS (facts of the algorithm, not settings)."""
    out: dict = {}

    def walk(obj, prefix: str) -> None:
        for f in fields(type(obj)):
            m = f.metadata
            if m["role"] != IDENTITY:
                continue
            path = prefix + (m["key"] or f.name)
            if m["when"] is not None and not m["when"](cfg):
                if m["otherwise"] is not OMIT:
                    out.setdefault(path.split(".")[0], m["otherwise"])
                continue
            value = getattr(obj, f.name)
            if m["cli"].kind == "group":
                walk(value, path + ".")
            else:
                _put(out, path, _jsonable(value))

    walk(cfg, "")
    for path, value in getattr(type(cfg), "IDENTITY_CONSTANTS", {}).items():
        _put(out, path, value)
    return out


def option_fields(cls) -> list[tuple[dataclasses.Field, type | None]]:
    """Every field that is an option or argument, groups flattened: (field, its group class or None)."""
    out = []
    for f in fields(cls):
        kind = f.metadata["cli"].kind
        if kind == "group":
            g = group_class(cls, f)
            out += [(gf, g) for gf in fields(g) if gf.metadata["cli"].kind in ("option", "argument")]
        elif kind in ("option", "argument"):
            out.append((f, None))
    return out


def from_values(cls, values: dict):
    """A config of `cls` from option values by field name (groups' fields by their own names).
    Values are parsed (`Cli.parse`) with the flag named in any error; absent names keep defaults."""
    top: dict = {}
    groups: dict[str, dict] = {}
    group_of = {}
    for f in fields(cls):
        if f.metadata["cli"].kind == "group":
            g = group_class(cls, f)
            for gf in fields(g):
                group_of[gf.name] = (f.name, gf)
    by_name = {f.name: f for f in fields(cls)}
    for name, value in values.items():
        if name in group_of:
            gname, f = group_of[name]
            groups.setdefault(gname, {})[name] = parse_value(f, value)
            continue
        f = by_name[name]
        parsed = parse_value(f, value)
        if f.metadata["cli"].spread:
            top.update(parsed)
        else:
            top[name] = parsed
    for gname, vals in groups.items():
        top[gname] = group_class(cls, by_name[gname])(**vals)
    return cls(**top)


def flag_of(f: dataclasses.Field) -> str:
    """The main spelling of a setting on the command line (what error messages name)."""
    c = f.metadata["cli"]
    if c.kind == "argument":
        return f.name.upper()
    if c.flags:
        return c.flags[0].split("/")[0]
    return "--" + f.name.replace("_", "-")


def parse_value(f: dataclasses.Field, value):
    c = f.metadata["cli"]
    if c.parse is None or value is None:
        return value
    return c.parse(value, flag_of(f))

"""The Python API: every command as a function returning what the command reports.

    import hierdctl
    hierdctl.scenes(out="data/scenes", n_train=600, n_test=100)
    m = hierdctl.embed("data/scenes/test", model="local-dir:models/student", out="emb")
    hierdctl.index("emb", index_type="hnsw")
    hits = hierdctl.search("emb/index", text=["a red circle left of a blue square"], k=5)

Each function takes the stage's settings as keyword arguments — its config dataclass's
field names (hierdctl/configs.py; the function's docstring lists each with its command-line
flag and default; a repeatable option takes a list, or one value; the command's argument
may come first, positionally) — or the config dataclass itself, and returns the dict the
command reports: a manifest, a summary or a report. Values are checked as the command line
checks them, with the same messages: bad input raises `hierdctl.errors.UserError` whose
`where` names the command-line flag (`--k`, `--model`, `SOURCE`), before any model loads
where the CLI does. This module's own parameters: `distill(config_file=…, set=[…])` (the
command's --config and --set), and aliases of field names as the flags spell them
(eval's `model=`/`k=` for `models`/`ks`, search's `text=`/`image=` for `texts`/`images`).

`import hierdctl` stays light: hierdctl/__init__.py loads this module on first use, and the
stage (with torch) only when a function runs. Each function's docstring lists its settings.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import typing
from pathlib import Path

from hierdctl import configs, settings
from hierdctl.errors import UserError

# function name -> (config class, stage module)
STAGES = {
    "cache_teacher": (configs.CacheTeacherConfig, "hierdctl.stages.cache_teacher"),
    "distill": (configs.DistillConfig, "hierdctl.stages.distill"),
    "export": (configs.ExportConfig, "hierdctl.stages.export"),
    "eval_retrieval": (configs.EvalRetrievalConfig, "hierdctl.stages.eval_retrieval"),
    "eval_zeroshot": (configs.EvalZeroshotConfig, "hierdctl.stages.eval_zeroshot"),
    "eval_grounding": (configs.EvalGroundingConfig, "hierdctl.stages.eval_grounding"),
    "embed": (configs.EmbedConfig, "hierdctl.stages.embed"),
    "index": (configs.IndexConfig, "hierdctl.stages.index"),
    "search": (configs.SearchConfig, "hierdctl.stages.search"),
    "scenes": (configs.ScenesConfig, "hierdctl.stages.scenes"),
}
ALIASES = {"search": {"text": "texts", "image": "images"}, "eval_retrieval": {"model": "models", "k": "ks"},
           "eval_zeroshot": {"model": "models"}, "eval_grounding": {"model": "models"}}


# ----------------------------------------------------------------------------------
# Keyword arguments -> a config, checked like the command line
# ----------------------------------------------------------------------------------


def _settable(cls) -> dict[str, tuple[dataclasses.Field, type]]:
    """Every field a keyword may set: options, arguments, hidden fields (--set keys, a spread's
    targets) and a group's fields by their own names; the group itself too (an instance)."""
    out = {}
    for f in dataclasses.fields(cls):
        kind = f.metadata["cli"].kind
        out[f.name] = (f, cls)
        if kind == "group":
            g = settings.group_class(cls, f)
            out |= {gf.name: (gf, g) for gf in dataclasses.fields(g)}
    return out


def _is(value, t) -> bool:
    """Does a Python value fit a field's annotation (without the CLI's text parsing)?"""
    origin, args = typing.get_origin(t), typing.get_args(t)
    if t is typing.Any:
        return True
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", typing.Union)):
        return any(_is(value, a) for a in args)
    if t is type(None):
        return value is None
    if t is bool:
        return isinstance(value, bool)
    if t is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if t is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if t is str:
        return isinstance(value, str)
    if t is Path:
        return isinstance(value, (str, os.PathLike))
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_is(v, a) for v, a in zip(value, args))
        return all(_is(v, args[0]) for v in value) if args else True
    if dataclasses.is_dataclass(t):
        return isinstance(value, t)
    return isinstance(value, t) if isinstance(t, type) else True


def _expected(t) -> str:
    names = {bool: "True or False", int: "an integer", float: "a number", str: "a string", Path: "a path"}
    args = [a for a in typing.get_args(t) if a is not type(None)]
    if typing.get_origin(t) in (list, tuple):
        return f"a list of {_expected(args[0]).removeprefix('a ').removeprefix('an ')}s" if args else "a list"
    if args:
        return " or ".join(_expected(a) for a in args)
    return names.get(t, getattr(t, "__name__", str(t)))


def _value(f: dataclasses.Field, owner, value):
    """A keyword's value as the field holds it; UserError naming the flag when it cannot be."""
    flag = settings.flag_of(f)
    c = f.metadata["cli"]
    t = settings.field_types(owner)[f.name]
    origin = typing.get_origin(t)
    if c.parse is not None and value is not None:  # the CLI's parser reads its text and Python values alike
        try:
            return settings.parse_value(f, value)
        except UserError:
            raise
        except (TypeError, ValueError, AttributeError):
            raise UserError(f"cannot read {value!r}", flag) from None
    if origin is list and isinstance(value, (str, os.PathLike)):
        value = [value]  # a repeatable option given once
    if not _is(value, t):
        raise UserError(f"expected {_expected(t)}, got {value!r}", flag)
    if t is Path or (typing.get_args(t) and Path in typing.get_args(t) and isinstance(value, str)):
        return Path(value)
    if origin is list:
        return list(value)
    if origin is tuple:
        return tuple(value)
    return value


def build_config(name: str, config=None, kwargs: dict | None = None):
    """The config of API function `name` from `config` (its dataclass) or keyword arguments."""
    cls, _ = STAGES[name]
    kwargs = dict(kwargs or {})
    if isinstance(config, cls):
        if kwargs:
            raise TypeError(f"hierdctl.{name}(): give the {cls.__name__} or keyword arguments, not both")
        return config
    if config is not None:  # the command's argument (SOURCE, DIR, INDEX, …) given positionally
        arg = [f.name for f in dataclasses.fields(cls) if f.metadata["cli"].kind == "argument"]
        if not arg or dataclasses.is_dataclass(config):
            raise TypeError(f"hierdctl.{name}() takes a {cls.__name__} or keyword arguments, not a "
                            f"{type(config).__name__}")
        if arg[0] in kwargs:
            raise TypeError(f"hierdctl.{name}(): {arg[0]} given twice")
        kwargs[arg[0]] = config
    for alias, real in ALIASES.get(name, {}).items():
        if alias in kwargs:
            if real in kwargs:
                raise TypeError(f"hierdctl.{name}(): {alias}= and {real}= name one setting; give one")
            kwargs[real] = kwargs.pop(alias)
    fields = _settable(cls)
    unknown = sorted(set(kwargs) - set(fields))
    if unknown:
        close = [n for n in fields if n.startswith(unknown[0][:3])]
        raise UserError(f"unknown setting {unknown[0]!r}" + (f" (did you mean {', '.join(close)}?)" if close else
                                                             f" (settings: {', '.join(sorted(fields))})"),
                        f"hierdctl.{name}()")
    values = {}
    for k, v in kwargs.items():
        f, owner = fields[k]
        if f.metadata["cli"].kind == "group":
            if not isinstance(v, settings.group_class(cls, f)):
                raise UserError(f"expected a {settings.group_class(cls, f).__name__}", k)
            values[k] = v
            continue
        values[k] = _value(f, owner, v)
    for f, group in settings.option_fields(cls):  # what the command line requires (typer's "Missing option")
        owner = group or cls
        required = settings.default(owner, f.name) is dataclasses.MISSING or f.metadata["cli"].required
        if required and f.name not in values:
            raise UserError(f"is required: give {f.name}=…", settings.flag_of(f))
    return values


def _config_from(name: str, values: dict):
    """settings.from_values without re-parsing: values are already the fields' values."""
    cls, _ = STAGES[name]
    top, groups = {}, {}
    fields = _settable(cls)
    for k, v in values.items():
        f, owner = fields[k]
        if owner is cls:
            if f.metadata["cli"].spread and isinstance(v, dict):
                top |= v
            else:
                top[k] = v
        else:
            groups.setdefault(owner, {})[k] = v
    for f in dataclasses.fields(cls):
        if f.metadata["cli"].kind == "group":
            g = settings.group_class(cls, f)
            if g in groups:
                if f.name in top:
                    raise TypeError(f"hierdctl.{name}(): give {f.name}= or its fields, not both")
                top[f.name] = g(**groups[g])
    return cls(**top)


def _run(name: str, config, kwargs: dict) -> dict:
    cls, stage = STAGES[name]
    cfg = build_config(name, config, kwargs)
    if not isinstance(cfg, cls):
        cfg = _config_from(name, cfg)
    return importlib.import_module(stage).run(cfg)


# ----------------------------------------------------------------------------------
# The functions
# ----------------------------------------------------------------------------------


def cache_teacher(config: configs.CacheTeacherConfig | None = None, /, **settings_) -> dict:
    return _run("cache_teacher", config, settings_)


def distill(config: configs.DistillConfig | None = None, /, *, config_file: str | None = None,
            set: list[str] | tuple[str, ...] = (), **settings_) -> dict:
    if config is not None:
        return _run("distill", config, settings_)
    values = build_config("distill", None, settings_)
    cfg = configs.DistillConfig.resolve(values, config_file, list(set))
    return importlib.import_module(STAGES["distill"][1]).run(cfg)


def export(config: configs.ExportConfig | None = None, /, **settings_) -> dict:
    return _run("export", config, settings_)


def eval_retrieval(config: configs.EvalRetrievalConfig | None = None, /, **settings_) -> dict:
    return _run("eval_retrieval", config, settings_)


def eval_zeroshot(config: configs.EvalZeroshotConfig | None = None, /, **settings_) -> dict:
    return _run("eval_zeroshot", config, settings_)


def eval_grounding(config: configs.EvalGroundingConfig | None = None, /, **settings_) -> dict:
    return _run("eval_grounding", config, settings_)


def embed(config: configs.EmbedConfig | None = None, /, **settings_) -> dict:
    return _run("embed", config, settings_)


def index(config: configs.IndexConfig | None = None, /, **settings_) -> dict:
    return _run("index", config, settings_)


def search(config: configs.SearchConfig | None = None, /, **settings_) -> dict:
    return _run("search", config, settings_)


def scenes(config: configs.ScenesConfig | None = None, /, **settings_) -> dict:
    return _run("scenes", config, settings_)


_RETURNS = {
    "cache_teacher": "the cache's manifest (OUT/manifest.json) with this run's figures under 'this_run'",
    "distill": "the run's summary (steps, final loss terms, throughput, checkpoint)",
    "export": "the export's manifest (DIR/export.json) with 'out' and 'seconds'",
    "eval_retrieval": "the report of docs/eval.md (what --out writes)",
    "eval_zeroshot": "the report of docs/eval.md (what --out writes)",
    "eval_grounding": "the report of docs/eval.md (what --out writes)",
    "embed": "the embeddings folder's manifest (OUT/manifest.json) with this run's figures under 'this_run'",
    "index": "the index's manifest (INDEX/index.json) with 'out' and 'seconds'",
    "search": "{'queries': [{'text' | 'image', 'results': [{rank, score, row, key, path, captions | caption}]}], …}",
    "scenes": "the benchmark's summary (counts, files)",
}


def _doc(name: str) -> str:
    cls, _ = STAGES[name]
    lines = [f"`hierdctl {name.replace('_', '-')}` as a function: returns {_RETURNS[name]}.", "",
             f"Give the {cls.__name__} or these keyword arguments (the command's options; defaults as there):", ""]
    for f, group in settings.option_fields(cls):
        d = settings.default(group or cls, f.name)
        shown = "required" if d is dataclasses.MISSING or f.metadata["cli"].required else f"default {d!r}"
        lines.append(f"    {f.name} ({settings.flag_of(f)}, {shown}): {f.metadata['help']}")
    for alias, real in ALIASES.get(name, {}).items():
        lines.append(f"    {alias}: the same as {real}")
    if name == "distill":
        lines += ["    config_file (--config): a YAML file of settings; keyword arguments win",
                  "    set (--set): key=value overrides, last; the hidden settings (beta1, view_policy, …) too"]
    lines += ["", "Bad input raises hierdctl.errors.UserError naming the flag, as the command exits 2 with it."]
    return "\n".join(lines)


for _name in STAGES:
    globals()[_name].__doc__ = _doc(_name)

"""The command line: an adapter from options to each stage's typed config and `run(config)`.

Every command is built from its config class (hierdctl/configs.py): each field declared
with `setting(...)` becomes one option (or argument) with the field's default, help and
flag; the handful of options that are the adapter's own (--json, --config, --set,
--list-recipes) are listed in ADAPTER_OPTIONS. Only typer, rich and the pure-Python config
modules are imported at module level, so `hierdctl --help` is instant; each command
imports its stage (and with it torch) when it runs. A `UserError` anywhere becomes one
message naming the flag or file, and exit code 2.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import json
import sys
import typing
from pathlib import Path
from typing import Callable, List, Optional

import typer

from . import settings
from .configs import (CacheTeacherConfig, DistillConfig, EvalGroundingConfig, EvalRetrievalConfig, EvalZeroshotConfig,
                      ExportConfig, ScenesConfig)
from .errors import Interrupted, UserError

app = typer.Typer(
    help="Distil CLIP-style teachers into small retrieval students: cache the teacher once, "
    "train students offline (CLIP-KD, TinyCLIP, CLIP-RD, HieRD), export, evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Options of the adapter itself, by command: (parameter name, its typer declaration, its type).
JSON_OPTION = ("json_out", lambda: typer.Option(False, "--json", help="Print the report as JSON on stdout."), bool)
ADAPTER_OPTIONS: dict[str, list[tuple[str, Callable, type]]] = {
    "distill": [
        ("config", lambda: typer.Option(None, help="A YAML file of settings (command-line options win)."),
         Optional[str]),
        ("set_", lambda: typer.Option([], "--set", help="key=value override of any setting (repeatable; unknown keys "
                                                        "are errors)."), List[str]),
        ("list_recipes", lambda: typer.Option(False, "--list-recipes", help="List the shipped recipes and exit."),
         bool),
    ],
    "eval-retrieval": [JSON_OPTION],
    "eval-zeroshot": [JSON_OPTION],
    "eval-grounding": [JSON_OPTION],
}


def _fail(e: UserError) -> None:
    from .console import console

    console.print(f"[bold red]error:[/] {_escape(str(e))}", soft_wrap=True)  # one line, never wrapped
    raise typer.Exit(2)


_AT_FORK: list = []  # registered once per process


@contextlib.contextmanager
def _interruptible():
    """SIGTERM raises Interrupted in the main thread (SIGINT raises KeyboardInterrupt as always), so
    a stage stops where it is, releases its lock and says in one line where it stopped. A process
    forked meanwhile (a DataLoader worker) gets the default SIGTERM back: it dies silently with
    the stage instead of printing its own traceback."""
    import os
    import signal

    def on_term(signum, frame):
        raise Interrupted(signum)

    previous = signal.signal(signal.SIGTERM, on_term)
    if not _AT_FORK:
        os.register_at_fork(after_in_child=_default_sigterm)
        _AT_FORK.append(True)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _default_sigterm() -> None:
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _interrupted(e: BaseException, command: str) -> None:
    import signal

    from .console import console

    signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
    what = (e.what if isinstance(e, Interrupted) else "") or {
        "cache-teacher": "interrupted; rerun the same command to continue: finished shards are kept",
        "embed": "interrupted; rerun the same command to continue: finished shards are kept",
        "distill": "interrupted; rerun with --resume to continue from the last checkpoint"}.get(
        command, "interrupted; nothing was replaced: rerun the command")
    console.print(f"[bold red]{_escape(what)}[/] ({signal.Signals(signum).name})", soft_wrap=True)
    raise typer.Exit(128 + signum)


def _escape(s: str) -> str:
    from rich.markup import escape

    return escape(s)


# ----------------------------------------------------------------------------------
# Commands from config classes
# ----------------------------------------------------------------------------------


def _cli_type(t):
    """A field type as typer reads it: `X | None` -> Optional[X], list[str] -> List[str]."""
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin in (list, List):
        return List[args[0]]
    if args and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return Optional[_cli_type(rest[0])]
    return t


def _parameters(cls, command: str) -> list[inspect.Parameter]:
    params = []
    for f, group in settings.option_fields(cls):
        c = f.metadata["cli"]
        owner = group or cls
        d = settings.default(owner, f.name)
        required = c.required or d is dataclasses.MISSING
        shown = c.show(d) if (c.show and not required) else d
        value = ... if required else shown
        hide = not required and d in ("", None, ())
        kw = {"help": f.metadata["help"], "show_default": not hide}
        info = typer.Argument(value, **kw) if c.kind == "argument" else typer.Option(value, *c.flags, **kw)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=info,
                                        annotation=_cli_type(c.type or settings.field_types(owner)[f.name])))
    for name, make, t in ADAPTER_OPTIONS.get(command, []):
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=make(), annotation=t))
    return params


def command(name: str, cls, stage: str, render: Callable, *, errors: dict[str, str] | None = None,
            build: Callable | None = None, before: Callable | None = None):
    """Register `hierdctl NAME`: options from `cls`'s fields; the config goes to `stage`.run.

    build(values, given, adapter) -> config (default: settings.from_values); before(adapter)
    may answer the command itself (--list-recipes) and return True; errors maps an exception
    class of the stage to the label of its one-line exit-1 message."""
    params = _parameters(cls, name)
    adapter_names = [p[0] for p in ADAPTER_OPTIONS.get(name, [])]

    def handler(ctx: typer.Context, **kwargs):
        from click.core import ParameterSource

        adapter = {k: kwargs.pop(k) for k in adapter_names}
        if before is not None and before(adapter):
            return
        given = {k: v for k, v in kwargs.items() if ctx.get_parameter_source(k) != ParameterSource.DEFAULT}
        module = importlib.import_module(stage)
        failures = tuple(getattr(module, e) for e in (errors or {}))
        try:
            with _interruptible():
                cfg = build(kwargs, given, adapter) if build else settings.from_values(cls, kwargs)
                result = module.run(cfg)
        except (Interrupted, KeyboardInterrupt) as e:
            _interrupted(e, name)
        except UserError as e:
            _fail(e)
        except OSError as e:  # a write the stage did not guard: a full, read-only or unwritable output
            from .atomic import write_error

            err = write_error(e, None)
            if err is None:
                raise
            _fail(err)
        except failures as e:
            from .console import console

            console.print(f"[bold red]{errors[type(e).__name__]}:[/] {_escape(str(e))}", soft_wrap=True)
            raise typer.Exit(1)
        render(result, cfg, adapter)

    handler.__signature__ = inspect.Signature(
        [inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)] + params)
    handler.__annotations__ = {"ctx": typer.Context} | {p.name: p.annotation for p in params}
    handler.__doc__ = render.__doc__
    handler.__name__ = name.replace("-", "_")
    app.command(name)(handler)
    return handler


# ----------------------------------------------------------------------------------
# cache-teacher / cache-info
# ----------------------------------------------------------------------------------


def _cache_teacher_done(manifest: dict, cfg, adapter) -> None:
    """Run a frozen teacher over an image–text source and cache its features in WebDataset shards."""
    if manifest["this_run"]["rank"] == 0:
        from .render import cache_summary

        cache_summary(manifest, cfg.out)


command("cache-teacher", CacheTeacherConfig, "hierdctl.stages.cache_teacher", _cache_teacher_done)


@app.command("cache-info")
def cache_info(
    cache: Path = typer.Argument(..., help="A cache directory written by cache-teacher."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON on stdout."),
    verify: bool = typer.Option(False, "--verify", help="Re-read every shard and check its size, sample count and sha256 against the manifest (exit 1 on a mismatch)."),
):
    """Show a teacher cache's manifest; --verify checks every shard's bytes."""
    from . import cache_format

    try:
        m = cache_format.read_manifest(cache)
        problems = cache_format.verify_cache(cache) if verify else None
    except UserError as e:
        _fail(e)
    if as_json:
        sys.stdout.write(json.dumps(m | ({"verify": problems} if verify else {}), indent=2, sort_keys=True) + "\n")
    else:
        from .render import cache_summary

        cache_summary(m, cache)
    if verify:
        from .console import console

        if problems:
            for line in problems:
                console.print(f"[bold red]damaged:[/] {_escape(line)}", soft_wrap=True)
            console.print(f"{len(problems)} problem(s): rerun cache-teacher on {_escape(str(cache))} with the same "
                          "options to redo the damaged shards", soft_wrap=True)
            raise typer.Exit(1)
        console.print(f"verified: every shard of {_escape(str(cache))} matches the manifest", soft_wrap=True)


# ----------------------------------------------------------------------------------
# distill, export
# ----------------------------------------------------------------------------------


def _list_recipes(adapter: dict) -> bool:
    if not adapter["list_recipes"]:
        return False
    from rich.table import Table

    from .console import console
    from .losses.registry import list_recipes

    t = Table("recipe", "description", title="shipped recipes")
    for name, desc in list_recipes():
        t.add_row(name, desc)
    console.print(t)
    return True


def _distill_config(values: dict, given: dict, adapter: dict) -> DistillConfig:
    """Only what the command line said overrides --config; the rest are the config's defaults."""
    fields = {f.name: f for f in dataclasses.fields(DistillConfig)}
    cli = {k: settings.parse_value(fields[k], v) for k, v in given.items()}
    return DistillConfig.resolve(cli, adapter["config"], adapter["set_"])


def _distill_done(summary: dict, cfg, adapter) -> None:
    """Train a small open_clip student offline from a teacher cache; the teacher is never loaded."""
    if summary["rank"] == 0:
        from .render import distill_summary

        distill_summary(summary)


command("distill", DistillConfig, "hierdctl.stages.distill", _distill_done, build=_distill_config,
        before=_list_recipes, errors={"TrainingDiverged": "training stopped"})


def _export_done(summary: dict, cfg, adapter) -> None:
    """Export a trained student as an open_clip local dir (open_clip, CLIP_benchmark), ONNX, and/or a transformers CLIPModel."""
    from .render import export_summary

    export_summary(summary)


command("export", ExportConfig, "hierdctl.stages.export", _export_done,
        errors={"ExportMismatch": "export check failed"})


# ----------------------------------------------------------------------------------
# eval-retrieval, eval-zeroshot
# ----------------------------------------------------------------------------------


def _emit_report(report: dict, cfg, adapter) -> None:
    """An evaluation report as JSON on stdout (--json) or as the rich table on stderr."""
    if adapter["json_out"]:
        sys.stdout.write(json.dumps(report, indent=2, sort_keys=True) + "\n")
    else:
        from .render import eval_table

        eval_table(report)


def _retrieval_done(report, cfg, adapter) -> None:
    """Image↔text recall@K (CLIP_benchmark's metrics) with a FAISS index; hard-negative accuracy where the data has them."""
    _emit_report(report, cfg, adapter)


def _zeroshot_done(report, cfg, adapter) -> None:
    """Zero-shot classification: top-1, top-5 and mean per-class recall (CLIP_benchmark's names)."""
    _emit_report(report, cfg, adapter)


def _grounding_done(report, cfg, adapter) -> None:
    """Phrase grounding from patch tokens: pointing-game accuracy and box mass, with chance levels and a control."""
    _emit_report(report, cfg, adapter)
    if not adapter["json_out"]:
        from .console import console

        for note in report["notes"]:
            console.print(f"[dim]eval-grounding:[/] {_escape(note)}", soft_wrap=True)


command("eval-retrieval", EvalRetrievalConfig, "hierdctl.stages.eval_retrieval", _retrieval_done)
command("eval-zeroshot", EvalZeroshotConfig, "hierdctl.stages.eval_zeroshot", _zeroshot_done)
command("eval-grounding", EvalGroundingConfig, "hierdctl.stages.eval_grounding", _grounding_done)


# ----------------------------------------------------------------------------------
# embed, index, search (issue 20): a collection embedded, indexed and searched
# ----------------------------------------------------------------------------------

from .configs import EmbedConfig, IndexConfig, SearchConfig  # noqa: E402

ADAPTER_OPTIONS.update({"embed": [JSON_OPTION], "index": [JSON_OPTION], "search": [JSON_OPTION]})


def _json_or(render_name: str):
    def done(result: dict, cfg, adapter) -> None:
        if adapter["json_out"]:
            sys.stdout.write(json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")
        else:
            from . import render

            getattr(render, render_name)(result)

    return done


def _embed_done(manifest: dict, cfg, adapter) -> None:
    """Embed a collection's images and/or texts (captions optional) into resumable shards with their keys."""
    _json_or("embed_summary")(manifest, cfg, adapter)


def _index_done(manifest: dict, cfg, adapter) -> None:
    """Build a FAISS index over an embeddings folder: flat (exact), ivf, hnsw or pq with its recall@10 measured."""
    _json_or("index_summary")(manifest, cfg, adapter)


def _search_done(result: dict, cfg, adapter) -> None:
    """Search an index with text or image queries: top-k keys, paths, captions and scores."""
    _json_or("search_table")(result, cfg, adapter)


command("embed", EmbedConfig, "hierdctl.stages.embed", _embed_done)
command("index", IndexConfig, "hierdctl.stages.index", _index_done)
command("search", SearchConfig, "hierdctl.stages.search", _search_done)


# ----------------------------------------------------------------------------------
# scenes, version
# ----------------------------------------------------------------------------------


def _scenes_done(summary: dict, cfg, adapter) -> None:
    """Write the Scenes benchmark: compositional image–caption shards with hard negatives."""
    from .render import scenes_summary

    scenes_summary(summary, cfg.flavour, cfg.out)


command("scenes", ScenesConfig, "hierdctl.stages.scenes", _scenes_done)


@app.command("version")
def version():
    """Print the version."""
    from . import __version__

    typer.echo(f"hierdctl {__version__}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()

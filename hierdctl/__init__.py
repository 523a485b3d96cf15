"""hierdctl: distil CLIP-style teachers into small retrieval students, from a cached teacher.

The Python API (docs/api.md): every command as a function taking its settings as keyword
arguments (or its config dataclass) and returning its report —

    hierdctl.cache_teacher  distill  export  eval_retrieval  eval_zeroshot  eval_grounding  embed  index  search
    scenes

They live in hierdctl/api.py, loaded on first use: `import hierdctl` (and `hierdctl --help`)
imports nothing heavy.
"""

__version__ = "0.1.0"

API = ("cache_teacher", "distill", "export", "eval_retrieval", "eval_zeroshot", "eval_grounding", "embed", "index", "search",
       "scenes")
__all__ = ["__version__", *API]


def __getattr__(name: str):
    if name in API:
        from hierdctl import api

        return getattr(api, name)
    raise AttributeError(f"module 'hierdctl' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(API))

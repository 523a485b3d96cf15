"""Make a CUDA build of torchvision importable against a CPU build of torch.

torchvision's Python package registers fake (meta) kernels for its C++ ops at import
time. When its native library `_C.so` cannot load (a CUDA wheel next to CPU torch),
the ops `torchvision::nms` and `torchvision::qnms` were never defined and the import
fails with "operator torchvision::nms does not exist" -- which breaks open_clip.

`ensure_torchvision()` defines just those two schemas, and only when the native
library really fails to load. The ops then exist (so the import succeeds) but have no
kernel: calling them raises, which is right, since nothing here uses NMS. Images are
decoded with PIL, never torchvision.io.
"""

from __future__ import annotations

import glob
import importlib.util
import os

_LIB = None  # keeps the torch.library.Library alive; dropping it would undefine the ops
_STATE: str | None = None  # "native", "shimmed", "absent"


def _native_library_loads() -> bool:
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return True  # nothing to fix; the import itself will report the absence
    libs = glob.glob(os.path.join(os.path.dirname(spec.origin), "_C*.so")) + glob.glob(
        os.path.join(os.path.dirname(spec.origin), "_C*.pyd")
    )
    if not libs:
        return False
    try:
        torch.ops.load_library(libs[0])
    except OSError:
        return False
    return True


def ensure_torchvision() -> str:
    """Call before anything imports torchvision (open_clip does). Returns how it was handled."""
    global _LIB, _STATE
    if _STATE is not None:
        return _STATE
    if importlib.util.find_spec("torchvision") is None:
        _STATE = "absent"
        return _STATE
    import sys

    if "torchvision" in sys.modules or _native_library_loads():
        _STATE = "native"
        return _STATE
    import torch

    _LIB = torch.library.Library("torchvision", "DEF")
    _LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIB.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
    _STATE = "shimmed"
    return _STATE


def _coca_generation_with_transformers_5() -> None:
    """open_clip 3.3's CoCa imports `BeamSearchScorer`, which transformers 5 removed; the failed
    import switches off *all* of CoCa's `generate`, top-p sampling included. Give the name a
    stand-in that only refuses beam search, so sampling (what cache-teacher --captioner uses)
    runs through open_clip's own generate. Runs only before open_clip is imported."""
    import sys

    if "open_clip" in sys.modules or importlib.util.find_spec("transformers") is None:
        return
    import transformers.generation as generation

    if hasattr(generation, "BeamSearchScorer"):
        return

    class BeamSearchScorer:  # noqa: D401 — a stand-in
        def __init__(self, *a, **k):
            raise RuntimeError("CoCa beam search needs transformers < 5 (BeamSearchScorer was removed); "
                               "hierdctl samples captions with top-p instead")

    generation.BeamSearchScorer = BeamSearchScorer


def import_open_clip():
    """open_clip, with the shims applied first. Use this instead of `import open_clip`."""
    ensure_torchvision()
    _coca_generation_with_transformers_5()
    import open_clip

    return open_clip

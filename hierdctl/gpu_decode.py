"""`distill --decode gpu`: a batch's JPEGs decoded on the device, their views replayed there.

On a GPU a small student steps faster than CPU cores decode and cut JPEGs (BENCHMARKS.md,
"The data stream at real resolution"). With decode "gpu" the loader's workers do not decode:
each item carries its image's encoded bytes and its view (`encode_item`), the batch keeps
them as a list (`collate`), and the trainer's `to_device` hands them to `BatchDecoder`, which

  1. decodes every JPEG of the batch in one call of torchvision's `decode_jpeg` on the
     device (nvJPEG on CUDA; libjpeg-turbo on the CPU, the same call: that CPU run is what
     the tests compare with the PIL path);
  2. replays each view there: a crop view's box (original pixels, whole pixels) is sliced
     and resized to S×S with PyTorch's antialiased bicubic (PIL's filter: the CPU path's
     `images.decode_view` and cache-teacher use PIL's, or PyTorch's own uint8 version of it),
     rounded to 8-bit values as PIL's output is; an eval view is resize-shorter-side + centre
     crop with the arithmetic of the student's eval transform (`images.EvalPlan`);
  3. flips, and normalises the whole batch at once.

What the device does not replay is decoded by the worker on the CPU, as without --decode gpu
(`images.decode_view`), and travels as pixels: non-JPEG images (PNG, …), JPEGs that are not
8-bit RGB/greyscale (CMYK), views with RandAugment ops (PIL's ops; no tensor replay of them
is bit-compatible), and eval views when the student's eval transform is not one
`images.eval_plan` recognises. A JPEG whose header does not parse, that is a decompression
bomb, or that lacks its end-of-image marker (a cut file) is refused in the worker exactly
where the CPU path refuses it (`BadImage` -> the cache reader's `CorruptSample`, replaced by
the next good sample, counted). A JPEG the device cannot decode after that is decoded on the
CPU by the PIL path; one that no decoder reads is replaced by the next good row of the same
batch (every field of it, so the batch keeps its size) and noted in the batch's `bad` field,
which distill counts and names like any damaged sample.
"""

from __future__ import annotations

import numpy as np

from hierdctl.images import BadImage, EvalPlan, View, decode_view, open_checked

# A view as 6 integers: kind, x, y, w, h, flip. Kind: 1 crop, 0 eval, -1 decoded in the worker.
CROP, EVAL, ON_CPU = 1, 0, -1
REPLAYED_MODES = ("RGB", "L")  # JPEG colour modes decoded on the device (ImageReadMode.RGB; L is replicated)


def device_replays(img, view: View, plan: EvalPlan | None) -> bool:
    """True when the device decodes this (header-read) image and replays this view."""
    return (img.format == "JPEG" and img.mode in REPLAYED_MODES and not view.ops
            and (view.kind == "crop" or (view.kind == "eval" and plan is not None)))


def has_end_marker(data: bytes) -> bool:
    """A JPEG's end-of-image marker FF D9 near its end. Inside entropy-coded data FF is always
    followed by 00 or a restart marker, so a cut file lacks it (unless cut inside an EXIF
    thumbnail, where the header would not parse)."""
    return b"\xff\xd9" in data[-4096:]


def encode_item(data: bytes, view: View, size: int, mean, std, eval_transform, plan: EvalPlan | None) -> dict:
    """The image fields of a loader item under decode "gpu" (run in the worker):
    {"jpeg": (n,) uint8 bytes, "view": (6,) int64} for the device, or, for what the device
    does not replay, {"jpeg": (0,) uint8, "view": kind -1, "image": (3,S,S) float32} decoded
    here by `images.decode_view`. Raises BadImage where the CPU path does."""
    import torch

    img = open_checked(data)  # header only: the bomb and size checks of the CPU path
    if device_replays(img, view, plan):
        if not has_end_marker(data):
            raise BadImage("truncated_image", "no JPEG end-of-image marker (the file is cut)")
        kind = CROP if view.kind == "crop" else EVAL
        return {"jpeg": torch.frombuffer(bytearray(data), dtype=torch.uint8),
                "view": torch.tensor([kind, *view.box, int(view.flip)], dtype=torch.int64)}
    return {"jpeg": torch.empty(0, dtype=torch.uint8), "view": torch.tensor([ON_CPU, 0, 0, 0, 0, 0]),
            "image": decode_view(data, view, size, mean, std, eval_transform, plan)}


def collate(items: list[dict]) -> dict:
    """default_collate, except for the ragged image fields, which become flat tensors (one
    shared-memory block each when a worker hands the batch over, not one per sample):
    "jpeg" (N,) uint8, every row's bytes end to end, "jpeg_len" (B,) int64 (0 for a row
    decoded in the worker), "cpu_image" (n,3,S,S) float32, those rows' pixels in row order."""
    import torch
    from torch.utils.data import default_collate

    if "jpeg" not in items[0]:
        return default_collate(items)
    jpegs = [it.pop("jpeg") for it in items]
    cpu = [img for img in (it.pop("image", None) for it in items) if img is not None]
    batch = default_collate(items)
    batch["jpeg"] = torch.cat(jpegs)
    batch["jpeg_len"] = torch.tensor([len(j) for j in jpegs], dtype=torch.int64)
    batch["cpu_image"] = torch.stack(cpu) if cpu else torch.empty(0)
    return batch


class BatchDecoder:
    """Decodes a collated batch's images on `device` (see the module's docstring)."""

    def __init__(self, size: int, mean, std, plan: EvalPlan | None, device: str, eval_transform=None, where=None):
        import torch

        self.size, self.plan, self.device = size, plan, device
        self.mean, self.std, self.eval_transform = tuple(mean), tuple(std), eval_transform
        self.where = where or (lambda i: f"sample {i}")  # global sample index -> "shard-… sample …"
        self.m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.s = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.on_cpu = 0  # JPEGs the device could not decode, decoded by the PIL path instead

    def decode(self, jpegs: list) -> list:
        """(3,H,W) uint8 on the device per JPEG, None where the device cannot decode it."""
        from torchvision.io import ImageReadMode, decode_jpeg

        if not jpegs:
            return []
        try:
            return list(decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError:  # one bad stream fails the whole batched call: find it
            out = []
            for t in jpegs:
                try:
                    out.append(decode_jpeg(t, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError:
                    out.append(None)
            return out

    def cut(self, img, view: list[int]):
        """(3,S,S) float32 with 8-bit values (rounded, clamped): the view of a decoded (3,H,W) uint8 image."""
        import torch.nn.functional as F

        kind, x, y, w, h, _ = view
        if kind == CROP:
            region = img[None, :, y : y + h, x : x + w].float()  # (1,3,h,w)
            out = F.interpolate(region, size=(self.size, self.size), mode="bicubic", antialias=True,
                                align_corners=False)[0]
        else:
            assert kind == EVAL and self.plan is not None, view
            H, W = img.shape[-2:]
            rw, rh, left, top = self.plan.geometry(W, H)
            out = F.interpolate(img[None].float(), size=(rh, rw), mode="bicubic", antialias=True,
                                align_corners=False)[0, :, top : top + self.plan.crop, left : left + self.plan.crop]
        return out.round_().clamp_(0, 255)

    def __call__(self, batch: dict):
        """(B,3,S,S) float32 on the device, normalised; pops the batch's "jpeg", "jpeg_len",
        "cpu_image" and "view". A row no decoder reads takes the next good row's fields (in
        place) and a note in "bad"."""
        import torch

        views = batch.pop("view").tolist()
        B = len(views)
        jpegs = list(torch.split(batch.pop("jpeg"), batch.pop("jpeg_len").tolist()))  # views, nothing copied
        on_cpu = iter(batch.pop("cpu_image"))
        cpu = [next(on_cpu) if v[0] == ON_CPU else None for v in views]  # (3,S,S) for the worker's rows
        rows = [i for i in range(B) if views[i][0] != ON_CPU]
        decoded = self.decode([jpegs[i] for i in rows])
        failed: dict[int, str] = {}
        cut, cut_rows = [], []
        for i, img in zip(rows, decoded):
            if img is not None:
                cut.append(self.cut(img, views[i]))
                cut_rows.append(i)
                continue
            try:  # the device refused it: the CPU path (PIL), which may read what nvJPEG does not
                kind, x, y, w, h, flip = views[i]
                view = View("crop" if kind == CROP else "eval", (x, y, w, h), bool(flip))
                cpu[i] = decode_view(jpegs[i].numpy().tobytes(), view, self.size, self.mean, self.std,
                                     self.eval_transform, self.plan)
                self.on_cpu += 1
            except BadImage as e:
                failed[i] = f"{self.where(int(batch['index'][i]))}: bad_image: {e}"
        out = torch.empty((B, 3, self.size, self.size), dtype=torch.float32, device=self.device)
        if cut:
            x = torch.stack(cut)  # (n,3,S,S)
            flips = torch.tensor([views[i][5] for i in cut_rows], dtype=torch.bool, device=self.device)
            x = torch.where(flips.view(-1, 1, 1, 1), x.flip(-1), x)
            out[torch.tensor(cut_rows, device=self.device)] = (x.div_(255.0) - self.m) / self.s
        host = [i for i in range(B) if cpu[i] is not None]
        if host:
            out[torch.tensor(host, device=self.device)] = torch.stack([cpu[i] for i in host]).to(self.device)
        if failed:
            self._replace(batch, out, failed)
        return out

    def _replace(self, batch: dict, out, failed: dict[int, str]) -> None:
        """Each failed row takes the fields of the next good row of the batch (cyclically)."""
        import torch

        from hierdctl.cache_format import CorruptShard

        B = out.shape[0]
        good = [i for i in range(B) if i not in failed]
        if not good:
            raise CorruptShard(f"no image of a batch of {B} decodes: {next(iter(failed.values()))}")
        for i, note in failed.items():
            j = next(g for g in good[np.searchsorted(good, i):] + good)  # the next good row
            out[i] = out[j]
            for v in batch.values():
                if isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == B:
                    v[i] = v[j]
            bad = batch.setdefault("bad", [""] * B)
            bad[i] = f"{bad[i]}; {note}" if bad[i] else note

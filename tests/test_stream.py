"""distill's data stream at real resolution (issue 23): the cheap CPU path (`images.decode_view`:
JPEG draft decoding, one-pass crop + resize) and the GPU decode path (`hierdctl.gpu_decode`,
run here on the CPU: its fallback) against the path before them (`decode_rgb` + `apply_view`),
within stated interpolation tolerances; what falls back to the CPU; corrupt images skipped and
counted; the cache reader's fast .npy / tar header paths against numpy's and tarfile's; the
machine-sized loader rule. No timing is asserted (bench/bench_stream.py measures)."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from hierdctl import cache_format, gpu_decode, images, loader
from hierdctl.errors import UserError
from hierdctl.images import BadImage, View, apply_view, decode_rgb, decode_view, eval_box, random_resized_crop_box

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
STD_T = torch.tensor(STD).view(3, 1, 1)

# Tolerances in 8-bit grey levels (the pixels' own unit: 1 level = 1/255 before normalising),
# about 1.5x what was measured on the photos below (max over crops of each measure):
#   no draft, PyTorch's uint8 bicubic vs PIL's:          mean 0.02-0.07, max 9-15
#   draft 1/2, 1/4 (libjpeg's DCT scaling) vs full decode: mean 1.3-1.6, max 19-34
#     (PIL's bilinear vs its bicubic on the same crops: mean 0.5-0.7, max 13-17)
#   --decode gpu on the CPU (float bicubic) vs PIL's:     mean 0.16, max 19
TOL = {"torch": (0.1, 22), "draft": (2.5, 48), "gpu": (0.3, 28)}


def _photo(i: int, short: int) -> Image.Image:
    """A real photograph (scikit-image's bundled samples), shorter side `short`."""
    import skimage.data as d

    a = [d.astronaut, d.coffee, d.chelsea, d.rocket][i % 4]()
    img = Image.fromarray(a)
    w, h = img.size
    s = short / min(w, h)
    return img.resize((round(w * s), round(h * s)), Image.BICUBIC)


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


def _levels(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(mean, max) absolute difference of two normalised images, in grey levels."""
    d = ((a - b) * STD_T * 255).abs()
    return float(d.mean()), float(d.max())


def _old(data: bytes, view: View, size: int, tf) -> torch.Tensor:
    img, _ = decode_rgb(data)
    return apply_view(img, view, size, MEAN, STD, tf)


@pytest.fixture(scope="module")
def eval_tf():
    from open_clip.transform import image_transform

    return image_transform(64, is_train=False, mean=MEAN, std=STD)


@pytest.fixture()
def draft_scales(monkeypatch):
    """The scale every JPEG draft decoded at (PIL's own draft, recorded)."""
    from PIL import JpegImagePlugin

    seen, real = [], JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        w0 = self.size[0]
        out = real(self, mode, size)
        if out is not None:  # (mode, box): the original spans (0, 0, w0 / s, h0 / s) of the draft
            seen.append(round(w0 / out[1][2]))
        return out

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    return seen


# ----------------------------------------------------------------------------------
# The CPU path: decode_view against decode_rgb + apply_view
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("short,size,draft_from,scale", [(256, 160, 4, 1), (256, 96, 4, 1), (256, 96, 2, 2),
                                                         (512, 100, 4, 4)])
def test_decode_view_crops_match_the_old_path(short, size, draft_from, scale, draft_scales, eval_tf):
    rng = np.random.default_rng(short + size)
    worst = (0.0, 0.0)
    for i in range(4):
        data = _jpeg(_photo(i, short))
        w, h = Image.open(io.BytesIO(data)).size
        for flip in (False, True):
            view = View("crop", random_resized_crop_box(rng, w, h, (0.9, 1.0), (3 / 4, 4 / 3)), flip)
            got = decode_view(data, view, size, MEAN, STD, eval_tf, draft_from=draft_from)
            want = _old(data, view, size, eval_tf)
            assert got.shape == want.shape == (3, size, size) and got.dtype == torch.float32
            mean, mx = _levels(got, want)
            worst = (max(worst[0], mean), max(worst[1], mx))
    # The draft happened exactly where the region is ≥ 2× the output (else this test proves nothing).
    assert set(draft_scales) == ({scale} if scale > 1 else set()), draft_scales
    tol = TOL["draft"] if scale > 1 else TOL["torch"]
    assert worst[0] <= tol[0] and worst[1] <= tol[1], (worst, tol)


@pytest.mark.parametrize("short,size", [(256, 160), (512, 64)])
def test_the_replayed_crop_is_the_same_region(short, size, eval_tf):
    """A bright disk on a dark photo-sized field: its centroid in the output lands where the
    old path puts it, to a tenth of an output pixel, with and without a draft and a flip."""
    w, h = short * 3 // 2, short
    a = np.full((h, w, 3), 20, np.uint8)
    yy, xx = np.mgrid[:h, :w]
    cx, cy = 0.55 * w, 0.4 * h
    a[(xx - cx) ** 2 + (yy - cy) ** 2 < (0.06 * h) ** 2] = 235
    data = _jpeg(Image.fromarray(a))

    def centroid(t):
        g = (t * STD_T + torch.tensor(MEAN).view(3, 1, 1)).mean(0).clamp(min=0) ** 4  # (S,S), the disk dominates
        ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        return float((g * xs).sum() / g.sum()), float((g * ys).sum() / g.sum())

    box = (int(0.2 * w), int(0.05 * h), int(0.7 * w), int(0.9 * h))
    for flip in (False, True):
        view = View("crop", box, flip)
        new = centroid(decode_view(data, view, size, MEAN, STD, eval_tf))
        old = centroid(_old(data, view, size, eval_tf))
        assert abs(new[0] - old[0]) < 0.1 and abs(new[1] - old[1]) < 0.1, (new, old)
    # A crop moved by 2 original pixels moves the disk by a measurable amount: the check can fail.
    moved = View("crop", (box[0] + 2, box[1], box[2], box[3]), False)
    shifted = centroid(decode_view(data, moved, size, MEAN, STD, eval_tf))
    assert abs(shifted[0] - centroid(_old(data, View("crop", box, False), size, eval_tf))[0]) > 2 * size / box[2] * 0.8


@pytest.mark.parametrize("short", [64, 256])
def test_eval_views_match_the_students_eval_transform(short, eval_tf, draft_scales):
    plan = images.eval_plan(eval_tf)
    assert plan == images.EvalPlan(64, 64, MEAN, STD)
    for i in range(4):
        data = _jpeg(_photo(i, short))
        w, h = Image.open(io.BytesIO(data)).size
        view = View("eval", eval_box(w, h))
        mean, mx = _levels(decode_view(data, view, 64, MEAN, STD, eval_tf, plan), _old(data, view, 64, eval_tf))
        tol = TOL["draft"] if short >= 128 else TOL["torch"]
        assert mean <= tol[0] and mx <= tol[1], (short, mean, mx)
        # Without a recognised plan the transform itself runs on the full-size image: the old pixels exactly.
        assert torch.equal(decode_view(data, view, 64, MEAN, STD, eval_tf, None), _old(data, view, 64, eval_tf))
    assert set(draft_scales) == ({4} if short == 256 else set())


def test_eval_plan_recognises_open_clips_transform_only():
    from open_clip.transform import image_transform
    from torchvision import transforms as T

    assert images.eval_plan(image_transform(224, is_train=False)).short == 224
    assert images.eval_plan(image_transform(224, is_train=False, resize_mode="squash")) is None
    assert images.eval_plan(image_transform(224, is_train=True)) is None
    assert images.eval_plan(lambda img: img) is None
    bilinear = T.Compose([T.Resize(64, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(64), T.ToTensor(),
                          T.Normalize(MEAN, STD)])
    assert images.eval_plan(bilinear) is None
    plain = T.Compose([T.Resize(72, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(64), T.ToTensor(),
                       T.Normalize(MEAN, STD)])
    assert images.eval_plan(plain) == images.EvalPlan(72, 64, MEAN, STD)


def test_decode_view_keeps_decode_rgbs_checks_and_conversions(eval_tf):
    # Grey, CMYK JPEGs and an RGBA PNG are converted as decode_rgb converts them.
    base = _photo(0, 256)
    view = View("crop", (10, 20, 200, 180), True)
    for data in (_jpeg(base.convert("L")), _jpeg(base.convert("CMYK")), _encode_png(base.convert("RGBA"))):
        mean, mx = _levels(decode_view(data, view, 64, MEAN, STD, eval_tf), _old(data, view, 64, eval_tf))
        assert mean <= TOL["draft"][0] and mx <= TOL["draft"][1], (mean, mx)
    # A bomb is refused from its header, before any pixel is decoded (and before a draft).
    big = _jpeg(Image.new("RGB", (3000, 2000), (9, 9, 9)))
    with pytest.raises(BadImage) as e:
        decode_view(big, View("crop", (0, 0, 2000, 2000)), 64, MEAN, STD, eval_tf, max_pixels=1_000_000)
    assert e.value.reason == "decompression_bomb" and "3000x2000" in e.value.detail
    # A cut JPEG is a truncated image, as for decode_rgb.
    data = _jpeg(base)
    with pytest.raises(BadImage) as e:
        decode_view(data[: len(data) // 2], view, 64, MEAN, STD, eval_tf)
    assert e.value.reason == "truncated_image"


def test_randaugment_views_replay_the_same_ops(eval_tf):
    data = _jpeg(_photo(1, 256))
    ops = (("Rotate", 12.0), ("Solarize", 128.0), ("Posterize", 5.0))
    view = View("crop", (5, 5, 230, 230), True, ops)
    mean, _ = _levels(decode_view(data, view, 64, MEAN, STD, eval_tf), _old(data, view, 64, eval_tf))
    assert mean <= 2 * TOL["draft"][0]  # solarize/posterize turn a level's difference into a few; most pixels agree
    plain = decode_view(data, View("crop", view.box, True), 64, MEAN, STD, eval_tf)
    assert _levels(decode_view(data, view, 64, MEAN, STD, eval_tf), plain)[0] > 10  # the ops were applied


def _encode_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------------
# --decode gpu, run on the CPU: the same code with torchvision's CPU decoder
# ----------------------------------------------------------------------------------


def _batch(items: list[dict]) -> dict:
    for i, it in enumerate(items):
        it.setdefault("index", torch.tensor(i))
        it.setdefault("bad", "")
    return gpu_decode.collate(items)


def _decoder(size, plan, eval_tf):
    return gpu_decode.BatchDecoder(size, MEAN, STD, plan, "cpu", eval_tf)


@pytest.mark.parametrize("short,size", [(256, 64), (512, 160)])
def test_gpu_decode_on_the_cpu_matches_the_pil_path(short, size):
    from open_clip.transform import image_transform

    tf = image_transform(size, is_train=False, mean=MEAN, std=STD)
    plan = images.eval_plan(tf)
    rng = np.random.default_rng(size)
    datas, views = [], []
    for i in range(4):
        data = _jpeg(_photo(i, short))
        w, h = Image.open(io.BytesIO(data)).size
        for flip in (False, True):
            datas.append(data)
            views.append(View("crop", random_resized_crop_box(rng, w, h, (0.5, 1.0), (3 / 4, 4 / 3)), flip))
        datas.append(data)
        views.append(View("eval", eval_box(w, h)))
    items = [gpu_decode.encode_item(d, v, size, MEAN, STD, tf, plan) for d, v in zip(datas, views)]
    assert all(it["view"][0] != gpu_decode.ON_CPU and "image" not in it for it in items)  # all go to the device
    batch = _batch(items)
    out = _decoder(size, plan, tf)(batch)
    assert out.shape == (len(views), 3, size, size) and out.dtype == torch.float32
    assert not {"jpeg", "jpeg_len", "view", "cpu_image"} & set(batch)
    for k, (d, v) in enumerate(zip(datas, views)):
        mean, mx = _levels(out[k], _old(d, v, size, tf))
        assert mean <= TOL["gpu"][0] and mx <= TOL["gpu"][1], (k, v, mean, mx)
    # The flip is the flip: the unflipped and flipped crops of the same box are mirror images.
    a = _decoder(size, plan, tf)(_batch([gpu_decode.encode_item(datas[0], View("crop", views[0].box, f), size, MEAN,
                                                                 STD, tf, plan) for f in (False, True)]))
    assert torch.equal(a[1], a[0].flip(-1))


def test_what_the_device_does_not_replay_is_decoded_in_the_worker(eval_tf):
    plan = images.eval_plan(eval_tf)
    base = _photo(2, 256)
    crop = View("crop", (4, 8, 200, 190), True)
    cases = {  # image bytes, view -> decoded on the device?
        "jpeg": (_jpeg(base), crop, True),
        "png": (_encode_png(base), crop, False),
        "cmyk jpeg": (_jpeg(base.convert("CMYK")), crop, False),
        "grey jpeg": (_jpeg(base.convert("L")), crop, True),
        "randaugment": (_jpeg(base), View("crop", crop.box, True, (("Equalize", 0.0),)), False),
        "eval, plan": (_jpeg(base), View("eval", eval_box(*base.size)), True),
    }
    items = []
    for name, (data, view, on_device) in cases.items():
        it = gpu_decode.encode_item(data, view, 64, MEAN, STD, eval_tf, plan)
        assert (int(it["view"][0]) != gpu_decode.ON_CPU) == on_device, name
        assert ("image" in it) == (not on_device) and (it["jpeg"].numel() > 0) == on_device, name
        if not on_device:  # exactly the CPU path's pixels
            assert torch.equal(it["image"], decode_view(data, view, 64, MEAN, STD, eval_tf, plan)), name
        items.append(it)
    # An eval view whose transform is not recognised stays on the CPU too.
    it = gpu_decode.encode_item(cases["jpeg"][0], View("eval", eval_box(*base.size)), 64, MEAN, STD, eval_tf, None)
    assert int(it["view"][0]) == gpu_decode.ON_CPU
    cpu_rows = [k for k, it in enumerate(items) if "image" in it]
    want = {k: items[k]["image"] for k in cpu_rows}
    batch = _batch(items)
    # One flat tensor per field, so a worker hands the batch over in a few shared-memory blocks.
    assert batch["jpeg"].dtype == torch.uint8 and batch["jpeg"].ndim == 1
    assert batch["jpeg_len"].tolist() == [len(c[0]) if c[2] else 0 for c in cases.values()]
    assert batch["cpu_image"].shape == (len(cpu_rows), 3, 64, 64)
    out = _decoder(64, plan, eval_tf)(batch)
    for k in cpu_rows:  # a mixed batch: the worker's rows go through untouched
        assert torch.equal(out[k], want[k])
    for k, (data, view, on_device) in enumerate(cases.values()):
        if view.ops:  # equalize turns a level's difference into several: its replay is checked above
            continue
        mean, mx = _levels(out[k], _old(data, view, 64, eval_tf))
        assert mean <= TOL["draft"][0] and mx <= TOL["draft"][1], (k, mean, mx)


def test_a_cut_jpeg_is_refused_in_the_worker_like_the_cpu_path(eval_tf):
    data = _jpeg(_photo(0, 256))
    view = View("crop", (0, 0, 200, 200))
    cut = data[: len(data) * 2 // 3]
    with pytest.raises(BadImage) as cpu:
        decode_view(cut, view, 64, MEAN, STD, eval_tf)
    with pytest.raises(BadImage) as gpu:
        gpu_decode.encode_item(cut, view, 64, MEAN, STD, eval_tf, None)
    assert cpu.value.reason == gpu.value.reason == "truncated_image"
    with pytest.raises(BadImage) as e:  # not an image at all: the header does not parse, in both
        gpu_decode.encode_item(b"\xff\xd8 not a jpeg", view, 64, MEAN, STD, eval_tf, None)
    assert e.value.reason == "corrupt_image"


def _bad_huffman(data: bytes) -> bytes:
    """A JPEG whose header parses and whose end marker is there, but whose Huffman tables are
    garbage: no decoder reads it."""
    i = data.index(b"\xff\xc4")  # DHT
    n = int.from_bytes(data[i + 2 : i + 4], "big")
    return data[: i + 5] + bytes([0xFF]) * (n - 3) + data[i + 2 + n :]


def test_a_jpeg_no_decoder_reads_takes_the_next_good_row_and_is_noted(eval_tf):
    good = [_jpeg(_photo(i, 128)) for i in range(3)]
    bad = _bad_huffman(good[1])
    with pytest.raises(BadImage):
        decode_view(bad, View("crop", (0, 0, 100, 100)), 32, MEAN, STD, eval_tf)  # the PIL path cannot either
    datas = [good[0], bad, good[2]]
    items = [gpu_decode.encode_item(d, View("crop", (0, 0, 100, 100)), 32, MEAN, STD, eval_tf, None) for d in datas]
    for k, it in enumerate(items):
        it["text"] = torch.full((4,), k)
        it["index"] = torch.tensor(10 + k)
    batch = _batch(items)
    dec = gpu_decode.BatchDecoder(32, MEAN, STD, None, "cpu", eval_tf, where=lambda i: f"shard-00000.tar sample {i}")
    out = dec(batch)
    assert torch.equal(out[1], out[2]) and torch.equal(batch["text"][1], batch["text"][2])
    assert batch["index"].tolist() == [10, 12, 12]
    assert batch["bad"][0] == batch["bad"][2] == ""
    assert batch["bad"][1].startswith("shard-00000.tar sample 11: bad_image")
    # A whole batch of them is a corrupt shard, not an endless loop.
    with pytest.raises(cache_format.CorruptShard):
        dec(_batch([gpu_decode.encode_item(bad, View("crop", (0, 0, 100, 100)), 32, MEAN, STD, eval_tf, None)]))


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory, tiny_teacher):
    from conftest import make_shards
    from hierdctl.stages.cache_teacher import CacheTeacherConfig
    from hierdctl.stages.cache_teacher import run as cache_run

    d = tmp_path_factory.mktemp("stream")
    src = make_shards(d / "data", n_shards=1, per_shard=8)
    cache_run(CacheTeacherConfig(source=src, out=d / "cache", teacher=tiny_teacher, views=2, clusters=0,
                                 max_phrases=0, workers=0, quiet=True))
    return d / "cache"


def _trainer(cache_dir, decode: str):
    from hierdctl import distributed
    from hierdctl.losses.registry import load_recipe
    from hierdctl.stages import distill as S

    cfg = S.resolve_config(dict(cache=str(cache_dir), student="tiny-test", recipe="clip-kd", out=str(cache_dir.parent /
                                "run"), steps=1, batch_size=8, workers=0, quiet=True))
    cfg.decode = decode  # distill --decode
    cfg.validate()  # run() validates once, before build_trainer
    return S.build_trainer(cfg, cache_format.open_cache(cache_dir), load_recipe("clip-kd"), distributed.resolve(),
                           "cpu")


def test_distill_with_decode_gpu_trains_on_the_same_samples(tiny_cache):
    """The wiring: with decode "gpu" (here on the CPU) the trainer's batches hold, for the same
    samples and captions, the pixels the CPU path gives, within tolerance."""
    got = {}
    for decode in ("cpu", "gpu"):
        tr = _trainer(tiny_cache, decode)
        assert (tr.decoder is not None) == (decode == "gpu")
        got[decode] = tr.to_device(next(iter(tr.loader(0))))
    cpu, gpu = got["cpu"], got["gpu"]
    assert torch.equal(cpu["index"], gpu["index"]) and torch.equal(cpu["text"], gpu["text"])
    assert gpu["image"].shape == cpu["image"].shape
    std = torch.tensor(tr.data.dataset.io["std"]).view(1, 3, 1, 1)
    assert float(((gpu["image"] - cpu["image"]) * std * 255).abs().mean()) <= TOL["gpu"][0]
    with pytest.raises(UserError):
        _trainer(tiny_cache, "tpu")


def test_a_cut_cached_jpeg_is_skipped_and_counted_alike_with_decode_gpu(tiny_cache, monkeypatch):
    """The cache reader replaces a sample whose JPEG is cut by the next good one and names it,
    the same way with decode "gpu" as with "cpu"."""
    items = {}
    for decode in ("cpu", "gpu"):
        ds = _trainer(tiny_cache, decode).data.dataset
        real = ds._read

        def cut_third(i, real=real):
            s = real(i)
            if i == 3:  # its last 40 bytes lost: the header still parses, the scan is cut
                s.image = s.image[:-40]
                assert Image.open(io.BytesIO(s.image)).size == (48, 40)
            return s

        monkeypatch.setattr(ds, "_read", cut_third)
        items[decode] = ds[(3, 0)]
    for decode, it in items.items():
        assert int(it["index"]) == 4, decode  # the next good sample took its place
        assert it["bad"].startswith("shard-00000.tar sample 3: bad_image: "), it["bad"]
        assert "truncated_image" in it["bad"], it["bad"]
    assert items["cpu"]["bad"].split("truncated_image")[0] == items["gpu"]["bad"].split("truncated_image")[0]


# ----------------------------------------------------------------------------------
# The cache reader's fast paths: the same results as numpy's and tarfile's parsers
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("a", [np.zeros((2, 32), np.float16), np.arange(24, dtype=np.float32).reshape(2, 3, 4),
                               np.array(3.5, np.float32), np.zeros((0, 5), np.float16), np.arange(7, dtype=np.int8),
                               np.arange(9, dtype=np.uint8).reshape(3, 3), np.arange(4, dtype=np.uint16),
                               np.array([True, False]), np.arange(3, dtype=np.int64), np.ones((1,), np.float64)])
def test_npy_fast_path_equals_np_load(a):
    b = cache_format.npy_bytes(a)
    got = cache_format.npy_load(b)
    want = np.load(io.BytesIO(b), allow_pickle=False)
    assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want)
    assert got.flags.writeable and got.flags.c_contiguous


def test_npy_other_layouts_and_damage_go_to_np_load():
    for a in (np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)), np.arange(3, dtype=">f4")):
        b = cache_format.npy_bytes(a) if a.dtype.byteorder != ">" else _npy_raw(a)
        assert np.array_equal(cache_format.npy_load(b), np.load(io.BytesIO(b), allow_pickle=False))
    b = cache_format.npy_bytes(np.zeros((2, 32), np.float16))
    for damaged in (b[:-3], b.replace(b"'<f2'", b"'|O' "), b[:12] + bytes(x ^ 0xFF for x in b[12:20]) + b[20:]):
        with pytest.raises(Exception) as fast:
            cache_format.npy_load(damaged)
        with pytest.raises(Exception) as slow:
            np.load(io.BytesIO(damaged), allow_pickle=False)
        assert type(fast.value) is type(slow.value)
    # Trailing bytes after the data: np.load ignores them, and so does the fallback.
    assert np.array_equal(cache_format.npy_load(b + b"xx"), np.zeros((2, 32), np.float16))


def _npy_raw(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, a, allow_pickle=False)
    return buf.getvalue()


def test_tar_header_fast_path_equals_tarfile(tmp_path):
    members = [("00000_000001.meta.json", b"{}"), ("00000_000001.image.jpg", b"\xff" * 1000),
               ("00000_000001.img_emb.npy", b"x" * 513), ("00000_000001.empty", b"")]
    path = tmp_path / "s.tar"
    _write(path, members)
    raw = path.read_bytes()
    with tarfile.open(path) as tf:
        infos = tf.getmembers()
    for m in infos:
        h = raw[m.offset : m.offset + 512]
        assert cache_format._plain_header(h) == (m.name, m.size)
    end = infos[-1].offset_data + (infos[-1].size + 511) // 512 * 512  # the span: the members, no end blocks
    key, got = cache_format.read_span(raw[:end])
    assert key == "00000_000001" and got["image.jpg"] == b"\xff" * 1000 and got["img_emb.npy"] == b"x" * 513
    # A flipped byte breaks the checksum: the fast path declines, tarfile refuses, the sample is corrupt.
    h = bytearray(raw[:512])
    h[130] ^= 0x01
    assert cache_format._plain_header(bytes(h)) is None
    with pytest.raises(cache_format.CorruptSample) as e:
        cache_format.read_span(bytes(h) + raw[512:])
    assert e.value.reason == "bad_tar_header"
    assert cache_format._plain_header(bytes(512)) is None  # an end-of-archive block: tarfile's EOFHeaderError


def _write(path, members):
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


# ----------------------------------------------------------------------------------
# Workers and prefetch sized to the machine
# ----------------------------------------------------------------------------------


def test_workers_use_every_core_of_this_process_shared_by_the_nodes_processes(monkeypatch):
    assert loader.workers_for(3) == 3 and loader.workers_for(0) == 0  # an explicit --workers is kept
    assert loader.workers_for(-1, cpus=16, processes=1) == 15  # not capped at 8
    assert loader.workers_for(-1, cpus=16, processes=8) == 1
    assert loader.workers_for(-1, cpus=2, processes=4) == 0
    monkeypatch.setattr(loader.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5}, raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert loader.available_cpus() == 6 and loader.workers_for(-1) == 2


def test_prefetch_keeps_the_batches_in_flight_within_the_memory_budget():
    gb = 2**30
    b224 = loader.batch_bytes(256, 224)  # float pixels: 154 MB a batch
    assert 150e6 < b224 < 160e6
    assert loader.prefetch_for(0, b224, 8 * gb) is None
    assert loader.prefetch_for(15, b224, 8 * gb) == 3  # 15 × 3 × 154 MB ≤ 8 GiB < 15 × 4 × 154 MB
    assert loader.prefetch_for(15, b224, 32 * 2**20) == 1  # a 64 MB /dev/shm: one batch a worker, no more
    jpeg = loader.batch_bytes(256, 224, decode="gpu")  # bytes only with --decode gpu: 4 fit
    assert jpeg < b224 / 3 and loader.prefetch_for(15, jpeg, 8 * gb) == 4

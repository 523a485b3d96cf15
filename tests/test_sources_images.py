"""Units under cache-teacher: image decoding and conversion, views, every data-source form
and its skips, the cache's array encoding (int8 scales), spherical k-means, phrase
chunking, the pinned stack's imports and the top-level --help. No model is run here."""

from __future__ import annotations

import io
import json
import os
import re
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CAPTIONS, image_bytes, make_shards, write_tar
from hierdctl import atomic, cache_format
from hierdctl.cluster import pool_clusters, spherical_kmeans
from hierdctl.errors import UserError
from hierdctl.images import BadImage, View, apply_crop, decode_rgb, eval_box, random_resized_crop_box, sample_views
from hierdctl.sources import Sample, Skip, SourceOptions, open_source

REPO = Path(__file__).resolve().parents[1]


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def _rgb(w=48, h=40, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


# ----------------------------------------------------------------------------------
# decode_rgb
# ----------------------------------------------------------------------------------


def test_rgb_is_returned_unconverted():
    img, converted = decode_rgb(_encode(_rgb(), "PNG"))
    assert converted is None and img.mode == "RGB" and img.size == (48, 40)
    assert np.array_equal(np.asarray(img), np.asarray(_rgb()))  # PNG is lossless


@pytest.mark.parametrize(
    "mode,fmt",
    [("L", "JPEG"), ("L", "PNG"), ("CMYK", "JPEG"), ("RGBA", "PNG"), ("LA", "PNG"), ("P", "PNG"), ("1", "PNG")],
)
def test_other_modes_are_converted_to_rgb(mode, fmt):
    img, converted = decode_rgb(_encode(_rgb().convert(mode), fmt))
    assert img.mode == "RGB" and img.size == (48, 40)
    assert converted == mode


def test_alpha_is_composited_over_white():
    a = np.zeros((8, 8, 4), np.uint8)
    a[..., 0] = 200  # red channel, fully transparent left half, opaque right half
    a[:, 4:, 3] = 255
    img, converted = decode_rgb(_encode(Image.fromarray(a, "RGBA"), "PNG"))
    px = np.asarray(img)
    assert converted == "RGBA"
    assert (px[:, :4] == 255).all()  # transparent -> white
    assert (px[:, 4:] == [200, 0, 0]).all()


def test_16_bit_png_scales_the_full_range():
    a = np.array([[0, 65535], [32768, 1000]], np.uint16)
    data = _encode(Image.fromarray(a), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    img, converted = decode_rgb(data)
    px = np.asarray(img)
    assert converted in ("I;16", "I") and img.mode == "RGB"
    assert px[0, 0].tolist() == [0, 0, 0] and px[0, 1].tolist() == [255, 255, 255]
    assert px[1, 0, 0] == 128 and px[1, 1, 0] == 4  # scaled by 255/65535, not clipped


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", "empty_image"),
        (b"this is not an image at all", "corrupt_image"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "corrupt_image"),
    ],
)
def test_undecodable_bytes(data, reason):
    with pytest.raises(BadImage) as e:
        decode_rgb(data)
    assert e.value.reason == reason


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_image(fmt):
    data = _encode(_rgb(), fmt)
    with pytest.raises(BadImage) as e:
        decode_rgb(data[: len(data) // 2])
    assert e.value.reason == "truncated_image"


def test_decompression_bomb_is_refused_before_decoding():
    # A 4000x4000 one-colour PNG is a few kB on disk and 48 MB decoded.
    data = _encode(Image.new("RGB", (4000, 4000), (9, 9, 9)), "PNG")
    assert len(data) < 100_000
    with pytest.raises(BadImage) as e:
        decode_rgb(data, max_pixels=1_000_000)
    assert e.value.reason == "decompression_bomb" and "4000x4000" in e.value.detail
    assert decode_rgb(data, max_pixels=16_000_000)[0].size == (4000, 4000)


def bomb_png(w=100_000, h=100_000) -> bytes:
    """A valid PNG header claiming w x h RGB pixels, with a tiny IDAT: nothing is allocated."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8-bit RGB, deflate, no filter, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_a_bomb_beyond_pils_own_limit_is_a_bad_image():
    """PIL raises DecompressionBombError inside Image.open for more than 2 x MAX_IMAGE_PIXELS
    (here 10^10 pixels): that was an uncaught traceback; it is a counted decompression_bomb."""
    data = bomb_png()
    assert len(data) < 100
    with pytest.raises(BadImage) as e:
        decode_rgb(data)
    assert e.value.reason == "decompression_bomb" and "100000x100000" in e.value.detail


def test_the_callers_max_pixels_decides_not_pils_global(monkeypatch):
    # With PIL's global limit lowered below the image, Image.open alone refuses it; decode_rgb
    # follows its caller's max_pixels, and leaves PIL's global as it found it.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    data = _encode(_rgb(100, 100), "PNG")  # 10,000 pixels > 2 x 1000
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(data))
    img, _ = decode_rgb(data, max_pixels=20_000)
    assert img.size == (100, 100) and np.array_equal(np.asarray(img), np.asarray(_rgb(100, 100)))
    with pytest.raises(BadImage) as e:
        decode_rgb(data, max_pixels=9_999)
    assert e.value.reason == "decompression_bomb" and "100x100 > 9999" in e.value.detail
    assert Image.MAX_IMAGE_PIXELS == 1000


# ----------------------------------------------------------------------------------
# Views
# ----------------------------------------------------------------------------------


def test_eval_box_is_the_centre_square():
    assert eval_box(48, 40) == (4, 0, 40, 40)
    assert eval_box(40, 48) == (0, 4, 40, 40)
    assert eval_box(32, 32) == (0, 0, 32, 32)


def test_random_crops_stay_inside_and_follow_the_scale_range():
    rng = np.random.default_rng(0)
    for _ in range(200):
        x, y, w, h = random_resized_crop_box(rng, 64, 48, (0.3, 1.0), (3 / 4, 4 / 3))
        assert 0 <= x and 0 <= y and 0 < w and 0 < h and x + w <= 64 and y + h <= 48
        assert 0.3 * 64 * 48 * 0.9 <= w * h <= 64 * 48


def test_views_depend_only_on_the_generator():
    a = sample_views(np.random.default_rng([0, 7]), 48, 40, 4, (0.5, 1.0), (0.75, 1.33), 0.5)
    b = sample_views(np.random.default_rng([0, 7]), 48, 40, 4, (0.5, 1.0), (0.75, 1.33), 0.5)
    assert a == b and len(a) == 4
    assert a[0] == View("eval", (4, 0, 40, 40), False)
    assert all(v.kind == "crop" for v in a[1:])
    assert [View.from_json(json.loads(json.dumps(v.to_json()))) for v in a] == a


def test_apply_crop_cuts_the_box_and_flips():
    # Left half red, right half blue: a box inside the red half gives a red view.
    a = np.zeros((50, 60, 3), np.uint8)
    a[:, :30, 0] = 255
    a[:, 30:, 2] = 255
    a[:, :30, 1] = np.arange(30, dtype=np.uint8)[None] * 8  # a horizontal ramp, to see the flip
    img = Image.fromarray(a, "RGB")
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    box = (2, 5, 20, 30)
    plain = apply_crop(img, View("crop", box, False), 16, mean, std)
    flipped = apply_crop(img, View("crop", box, True), 16, mean, std)
    assert plain.shape == (3, 16, 16) and plain.dtype == torch.float32
    assert torch.allclose(plain[0], torch.ones(16, 16)) and float(plain[2].abs().max()) < 1e-6
    ramp = plain[1, 8]
    assert (ramp[1:] >= ramp[:-1]).all() and ramp[-1] - ramp[0] > 0.4  # green grows left to right
    assert torch.equal(flipped, plain.flip(-1))
    # The right half's box is blue; normalisation is (x - mean) / std.
    blue = apply_crop(img, View("crop", (35, 0, 20, 20), False), 8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert torch.allclose(blue[2], torch.ones(8, 8)) and torch.allclose(blue[0], -torch.ones(8, 8))
    assert torch.equal(apply_crop(img, View("crop", box, False), 16, mean, std), plain)  # reproducible


# ----------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------


def _collect(source):
    out = []
    for u in source.units:
        out += list(source.iter_unit(u))
    return out


def test_brace_directory_and_single_tar(tmp_path):
    pattern = make_shards(tmp_path / "d", n_shards=3, per_shard=2)
    by_brace = open_source(pattern)
    by_dir = open_source(str(tmp_path / "d"))
    one = open_source(str(tmp_path / "d" / "00001.tar"))
    assert len(by_brace.units) == len(by_dir.units) == 3 and len(one.units) == 1
    a, b = _collect(by_brace), _collect(by_dir)
    assert [s.key for s in a] == [s.key for s in b] == [f"{i:09d}" for i in range(6)]
    assert all(isinstance(s, Sample) and s.image_ext == "jpg" for s in a)
    assert a[0].captions == [CAPTIONS[0]] and a[0].meta["key"] == "000000000"
    assert [s.key for s in _collect(one)] == ["000000002", "000000003"]
    assert by_brace.describe() == {"kind": "webdataset", "spec": pattern, "units": 3}


def test_missing_sources_are_user_errors(tmp_path):
    make_shards(tmp_path / "d", n_shards=2, per_shard=1)
    with pytest.raises(UserError, match="no file of"):
        open_source(str(tmp_path / "nowhere" / "{00000..00003}.tar"))
    with pytest.raises(UserError, match="2 of 4 shards do not exist"):
        open_source(str(tmp_path / "d" / "{00000..00003}.tar"))
    with pytest.raises(UserError, match="does not exist"):
        open_source(str(tmp_path / "nothing.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no .tar"):
        open_source(str(tmp_path / "empty"))
    (tmp_path / "x.parquet").write_text("")
    with pytest.raises(UserError, match="cannot read"):
        open_source(str(tmp_path / "x.parquet"))


def test_tar_skips_by_reason(tmp_path):
    good = image_bytes(0)
    p = write_tar(tmp_path / "s.tar", [
        {"key": "a", "jpg": good, "txt": "  a   red\ncircle  "},
        {"key": "b", "jpg": good, "txt": "   "},
        {"key": "c", "jpg": good, "txt": b"\xff\xfe\xfa bad utf8"},
        {"key": "d", "txt": "no image here"},
        {"key": "e", "jpg": good},
        {"key": "f", "png": good, "json": {"captions": ["first", "second", "first"]}},
    ])
    got = {r.key: r for r in _collect(open_source(str(p)))}
    assert got["a"].captions == ["a red circle"]  # whitespace normalised
    assert (got["b"].reason, got["c"].reason, got["d"].reason, got["e"].reason) == (
        "empty_caption", "undecodable_caption", "missing_image", "missing_caption")
    assert got["f"].captions == ["first", "second"] and got["f"].image_ext == "png"


def test_non_string_json_captions_are_dropped(tmp_path):
    """Extra .json captions are cleaned like the rest: null, numbers, lists and blanks are
    dropped (never turned into "None" or "3"), whitespace folded, duplicates removed."""
    good = image_bytes(0)
    p = write_tar(tmp_path / "s.tar", [
        {"key": "a", "jpg": good, "txt": "a red circle",
         "json": {"captions": [None, 3, 2.5, True, ["nested"], {"x": 1}, "  ", " a  red circle ", "a blue  square"]}},
        {"key": "b", "jpg": good, "json": {"captions": [None, "only  this", 7]}},
        {"key": "c", "jpg": good, "json": {"captions": [None, 7, ""]}},
        {"key": "d", "jpg": good, "txt": "text", "json": ["not", "an", "object"]},
    ])
    got = {r.key: r for r in _collect(open_source(str(p)))}
    assert got["a"].captions == ["a red circle", "a blue square"]
    assert got["b"].captions == ["only this"]
    assert isinstance(got["c"], Skip) and got["c"].reason == "empty_caption"
    assert got["d"].captions == ["text"] and got["d"].meta == {}


def test_truncated_tar_keeps_what_came_before(tmp_path):
    p = write_tar(tmp_path / "s.tar", [{"key": f"k{i}", "jpg": image_bytes(i), "txt": CAPTIONS[i]} for i in range(4)])
    data = p.read_bytes()
    # Cut inside the third sample's image: two samples survive, then one truncated_tar skip.
    with tarfile.open(p) as tf:
        third = [m for m in tf.getmembers() if m.name == "k2.jpg"][0]
    p.write_bytes(data[: third.offset_data + third.size // 2])
    recs = _collect(open_source(str(p)))
    assert [type(r).__name__ for r in recs] == ["Sample", "Sample", "Skip"]
    assert recs[2].reason == "truncated_tar" and recs[2].key == "k2"
    # One skip per truncation: the detail says how many samples came before it, and what is lost.
    assert "2 samples read before it" in recs[2].detail and "(k2) and the rest of the shard" in recs[2].detail


def _tar_layout(path: Path) -> tuple[list[tarfile.TarInfo], int]:
    """The members (offset = header, offset_data = data) and where the end-of-archive blocks start."""
    with tarfile.open(path) as tf:
        members = tf.getmembers()
    last = members[-1]
    return members, last.offset_data + -(-last.size // 512) * 512


def test_a_cut_anywhere_is_one_truncated_tar_skip_with_the_count(tmp_path):
    """Cut the tar at every 512-byte boundary, inside every header and inside every member's
    data. Every sample whose successor's header was read is yielded; the sample being read and
    the rest are one truncated_tar skip that says how many samples came before. tarfile's stream
    mode took a cut inside (or right before) a header for the end of the archive: the partly read
    sample came out as missing_caption and the loss went unreported. A cut inside the
    end-of-archive zero blocks loses nothing: no skip."""
    samples = [{"key": f"k{i}", "jpg": image_bytes(i), "json": {"i": i}, "txt": CAPTIONS[i]} for i in range(4)]
    full = write_tar(tmp_path / "full.tar", samples).read_bytes()
    members, end = _tar_layout(tmp_path / "full.tar")
    first_header = {}  # key -> offset of its first member's header
    for m in members:
        first_header.setdefault(m.name.split(".")[0], m.offset)
    keys = list(first_header)
    cuts = set(range(0, end + 1, 512)) | {end + 1, end + 100, end + 512, end + 1024, len(full)}
    for m in members:
        cuts |= {m.offset + 1, m.offset + 300, m.offset_data + m.size // 2, m.offset_data + m.size}
    p = tmp_path / "cut.tar"
    for cut in sorted(cuts):
        p.write_bytes(full[:cut])
        recs = _collect(open_source(str(p)))
        got = [r.key for r in recs if isinstance(r, Sample)]
        skips = [r for r in recs if isinstance(r, Skip)]
        if cut > end:  # (part of) the end-of-archive blocks are there: the whole archive was read
            assert got == keys and not skips, cut
            continue
        # A sample is known complete once the next sample's first header has been read whole.
        done = [k for j, k in enumerate(keys[:-1]) if first_header[keys[j + 1]] + 512 <= cut]
        assert got == done, cut
        assert [s.reason for s in skips] == ["truncated_tar"], (cut, skips)
        (skip,) = skips
        being_read = keys[len(done)] if cut >= first_header[keys[len(done)]] + 512 else None
        assert skip.key == (being_read or str(p)), (cut, skip)
        assert re.search(rf"; {len(done)} samples read before it; ", skip.detail), (cut, skip.detail)
        assert recs[-1] is skip  # reported after the samples that came before it


def test_a_corrupt_header_and_a_file_that_is_no_tar(tmp_path):
    samples = [{"key": f"k{i}", "jpg": image_bytes(i), "txt": CAPTIONS[i]} for i in range(3)]
    p = write_tar(tmp_path / "s.tar", samples)
    members, _ = _tar_layout(p)
    data = bytearray(p.read_bytes())
    data[members[4].offset + 10] ^= 0xFF  # k2.jpg's header: its checksum no longer matches
    p.write_bytes(bytes(data))
    recs = _collect(open_source(str(p)))
    assert [r.key for r in recs] == ["k0", "k1"]  # k1 was being read: is it whole? Unknown.
    assert isinstance(recs[1], Skip) and recs[1].reason == "corrupt_tar" and "1 samples read before it" in recs[1].detail
    (tmp_path / "html.tar").write_bytes(b"<html>" + b"x" * 2000 + b"</html>")
    (tmp_path / "empty.tar").write_bytes(b"")
    (rec,) = _collect(open_source(str(tmp_path / "html.tar")))
    assert rec.reason == "corrupt_tar" and "0 samples read" in rec.detail
    (rec,) = _collect(open_source(str(tmp_path / "empty.tar")))
    assert rec.reason == "truncated_tar" and "the shard is empty" in rec.detail


def _table(tmp_path: Path, kind: str) -> Path:
    (tmp_path / "img").mkdir(exist_ok=True)
    for i in range(3):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(image_bytes(i))
    rows = [("img/0.jpg", CAPTIONS[0]), ("img/missing.jpg", CAPTIONS[1]), ("img/2.jpg", " "), ("img/1.jpg", CAPTIONS[3])]
    if kind == "jsonl":
        p = tmp_path / "pairs.jsonl"
        lines = [json.dumps({"filepath": f, "title": c}) for f, c in rows]
        lines.append(json.dumps({"filepath": "img/2.jpg", "title": ["one caption", "", "another"]}))
        p.write_text("\n".join(lines) + "\n\n")
    else:
        sep = "\t" if kind == "tsv" else ","
        p = tmp_path / f"pairs.{kind}"
        p.write_text(f"filepath{sep}title\n" + "".join(f"{f}{sep}\"{c}\"\n" for f, c in rows))
    return p


@pytest.mark.parametrize("kind", ["csv", "tsv", "jsonl"])
def test_tables(tmp_path, kind):
    p = _table(tmp_path, kind)
    src = open_source(str(p), SourceOptions(image_col="filepath", caption_col="title", rows_per_shard=2))
    assert len(src.units) == (3 if kind == "jsonl" else 2)
    assert [src.unit_rows(u) for u in src.units][:2] == [2, 2]
    recs = _collect(src)
    assert isinstance(recs[0], Sample) and recs[0].captions == [CAPTIONS[0]] and recs[0].image == image_bytes(0)
    assert isinstance(recs[1], Skip) and recs[1].reason == "missing_file" and "missing.jpg" in recs[1].detail
    assert isinstance(recs[2], Skip) and recs[2].reason == "empty_caption"
    assert recs[3].captions == [CAPTIONS[3]]
    if kind == "jsonl":
        assert recs[4].captions == ["one caption", "another"]  # a caption list, empties dropped
    with pytest.raises(UserError, match="column 'caption' not found"):
        open_source(str(p), SourceOptions(image_col="filepath"))


def _table_bytes(kind: str, rows: list[tuple[bytes, bytes]], bom: bool = False) -> bytes:
    """A table written byte for byte: rows of (image path, caption) as raw bytes."""
    if kind == "jsonl":  # the bytes go inside JSON strings as they are (no escaping needed here)
        body = b"".join(b'{"image": "' + f + b'", "caption": "' + c + b'"}\n' for f, c in rows)
    else:
        sep = b"\t" if kind == "tsv" else b","
        body = b"image" + sep + b"caption\n" + b"".join(f + sep + c + b"\n" for f, c in rows)
    return (b"\xef\xbb\xbf" if bom else b"") + body


@pytest.mark.parametrize("kind", ["csv", "tsv", "jsonl"])
def test_a_caption_that_is_not_utf8_skips_its_row(tmp_path, kind):
    """A Latin-1 caption among UTF-8 ones was a UnicodeDecodeError traceback when the table was
    read; now that row is an undecodable_caption skip (as in tar sources) and the rest load.
    Image paths keep their bytes: a Latin-1 file name on disk is found."""
    for i in range(3):
        (tmp_path / f"{i}.jpg").write_bytes(image_bytes(i))
    (tmp_path / os.fsdecode(b"caf\xe9.jpg")).write_bytes(image_bytes(3))
    rows = [(b"0.jpg", "café au lait".encode("latin-1")), (b"1.jpg", b"a fine caption"),
            (b"2.jpg", "naïve café".encode("utf-8")), (b"caf\xe9.jpg", b"a latin-1 file name")]
    if kind == "jsonl":
        rows.append((b"1.jpg", b"\\udce9 a lone surrogate, as a JSON escape"))
    p = tmp_path / f"pairs.{kind}"
    p.write_bytes(_table_bytes(kind, rows, bom=kind != "tsv"))  # a UTF-8 BOM is dropped
    recs = _collect(open_source(str(p)))
    assert isinstance(recs[0], Skip) and recs[0].reason == "undecodable_caption"
    assert recs[1].captions == ["a fine caption"] and recs[1].image == image_bytes(1)
    assert recs[2].captions == ["naïve café"]
    assert isinstance(recs[3], Sample) and recs[3].image == image_bytes(3)
    if kind == "jsonl":
        assert isinstance(recs[4], Skip) and recs[4].reason == "undecodable_caption"


@pytest.mark.parametrize("encoding", ["utf-16", "latin-1"])
def test_a_header_that_is_not_utf8_is_one_user_error(tmp_path, encoding):
    p = tmp_path / "pairs.csv"
    p.write_bytes("image,légende\n0.jpg,un chat\n".encode(encoding))
    with pytest.raises(UserError, match="is not UTF-8 text") as e:
        open_source(str(p), SourceOptions(caption_col="légende"))
    assert str(e.value).startswith(f"{p}: ") and "\n" not in str(e.value)
    j = tmp_path / "pairs.jsonl"
    j.write_bytes('{"image": "0.jpg", "caption": "un chat"}\n'.encode("utf-16"))
    with pytest.raises(UserError, match="line 1 is not UTF-8 text"):
        open_source(str(j))


def test_karpathy_split(tmp_path):
    (tmp_path / "images" / "val2014").mkdir(parents=True)
    images = []
    for i in range(4):
        (tmp_path / "images" / "val2014" / f"{i}.jpg").write_bytes(image_bytes(i))
        images.append({"filepath": "val2014", "filename": f"{i}.jpg", "imgid": i, "split": "test" if i < 3 else "train",
                       "sentences": [{"raw": CAPTIONS[i], "tokens": []}, {"tokens": ["a", "cat"]}]})
    p = tmp_path / "dataset_coco.json"
    p.write_text(json.dumps({"images": images}))
    src = open_source(str(p), SourceOptions(image_root=str(tmp_path / "images"), split="test"))
    recs = _collect(src)
    assert [r.key for r in recs] == ["0", "1", "2"]
    assert recs[0].captions == [CAPTIONS[0], "a cat"]
    assert len(_collect(open_source(str(p), SourceOptions(image_root=str(tmp_path / "images"), split="all")))) == 4
    with pytest.raises(UserError, match="no image in split 'val'"):
        open_source(str(p), SourceOptions(image_root=str(tmp_path / "images"), split="val"))
    with pytest.raises(UserError, match="--image-root"):
        open_source(str(p), SourceOptions(image_root=str(tmp_path / "nope")))


# ----------------------------------------------------------------------------------
# The cache's array encoding
# ----------------------------------------------------------------------------------


def test_int8_round_trip_within_one_127th_of_each_row():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 5, 64)).astype(np.float32) * rng.uniform(0.01, 10, size=(3, 5, 1)).astype(np.float32)
    a[0, 0] = 0.0  # an all-zero row (an empty cluster) stays zero
    members = dict((n.split(".", 1)[1], b) for n, b in cache_format.encode_sample(
        "k", {"image_ext": "jpg"}, None, {"clu_emb": a}, "int8")[1:])
    assert cache_format.npy_load(members["clu_emb.npy"]).dtype == np.int8
    assert cache_format.npy_load(members["clu_emb.scale.npy"]).shape == (3, 5)
    back = cache_format.decode_float(members, "clu_emb")
    row_max = np.abs(a).max(-1, keepdims=True)
    assert (np.abs(back - a) <= row_max / 127 + 1e-12).all()
    assert (back[0, 0] == 0).all()


@pytest.mark.parametrize("dtype,tol", [("fp32", 0.0), ("fp16", 1e-3)])
def test_float_members_round_trip(dtype, tol):
    a = np.random.default_rng(1).normal(size=(2, 32)).astype(np.float32)
    a /= np.linalg.norm(a, axis=-1, keepdims=True)
    members = dict(cache_format.encode_float("img_emb", a, dtype))
    np.testing.assert_allclose(cache_format.decode_float(members, "img_emb"), a, rtol=0, atol=tol)


def test_sample_members_are_ordered_and_never_pickled(tmp_path):
    arrays = {"txt_emb": np.ones((1, 4)), "clu_assign": np.zeros((2, 2, 2)), "img_emb": np.ones((2, 4))}
    meta = {"image_ext": "png", "captions": ["x"], "key": "é"}
    members = cache_format.encode_sample("00000_000000", meta, b"PNGDATA", arrays, "fp16")
    assert [n for n, _ in members] == ["00000_000000.meta.json", "00000_000000.image.png", "00000_000000.clu_assign.npy",
                                       "00000_000000.img_emb.npy", "00000_000000.txt_emb.npy"]
    written = atomic.write_tar_atomic(tmp_path / "s.tar", members)
    assert written.bytes == (tmp_path / "s.tar").stat().st_size and not list(tmp_path.glob("*.tmp*"))
    assert written.sha256 == atomic.sha256_file(tmp_path / "s.tar")  # hashed while writing
    (s,) = cache_format.read_shard(tmp_path / "s.tar")
    assert s.meta == meta and s.image == b"PNGDATA" and s.arrays["clu_assign"].dtype == np.uint8
    # Object arrays would need pickle: the loader refuses them.
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        cache_format.npy_load(buf.getvalue())


# ----------------------------------------------------------------------------------
# Clustering and phrases
# ----------------------------------------------------------------------------------


def test_spherical_kmeans_is_deterministic_and_complete():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(5, 16, 24, generator=g)
    a1, c1 = spherical_kmeans(tokens, 4, (4, 4), iters=10)
    a2, c2 = spherical_kmeans(tokens.clone(), 4, (4, 4), iters=10)
    assert torch.equal(a1, a2) and torch.equal(c1, c2)
    assert a1.shape == (5, 16) and c1.shape == (5, 4)
    assert (c1.sum(1) == 16).all() and int(a1.max()) < 4
    assert torch.equal(torch.stack([torch.bincount(a, minlength=4) for a in a1]), c1)
    # Each image is clustered on its own: batching does not change its result.
    a_one, _ = spherical_kmeans(tokens[2:3], 4, (4, 4), iters=10)
    assert torch.equal(a_one[0], a1[2])
    # Scale-invariant (spherical): scaling the tokens changes nothing.
    assert torch.equal(spherical_kmeans(tokens * 7.5, 4, (4, 4))[0], spherical_kmeans(tokens, 4, (4, 4))[0])


def test_kmeans_with_more_clusters_than_patches_leaves_empty_clusters():
    tokens = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(1))
    assign, counts = spherical_kmeans(tokens, 6, (2, 2))
    assert counts.shape == (2, 6) and (counts[:, 4:] == 0).all() and (counts.sum(1) == 4).all()
    pooled = pool_clusters(tokens, assign, 6)
    assert (pooled[:, 4:] == 0).all()
    torch.testing.assert_close(pooled[counts > 0].norm(dim=-1), torch.ones(int((counts > 0).sum())))


def test_position_weight_makes_clusters_spatial():
    # Identical tokens everywhere: with a position weight the clusters are spatial blocks.
    tokens = torch.ones(1, 16, 8)
    assign, counts = spherical_kmeans(tokens, 4, (4, 4), pos_weight=10.0)
    assert (counts == 4).all()
    grid = assign.view(4, 4)
    assert len({int(grid[r, c]) for r in (0, 1) for c in (0, 1)}) == 1  # the top-left block is one cluster


def test_textblob_chunker():
    from hierdctl.phrases import Chunker

    ch = Chunker("textblob")
    assert ch.backend == "textblob"
    assert ch("a red circle next to a blue square", 4) == ["a red circle", "a blue square"]
    assert ch("a red circle next to a blue square", 1) == ["a red circle"]
    assert ch("A dog and a dog and a cat", 4) == ["A dog", "a cat"]  # de-duplicated, case-insensitively
    with pytest.raises(UserError, match="--chunker"):
        Chunker("nonsense")


# ----------------------------------------------------------------------------------
# the stack and the CLI's --help
# ----------------------------------------------------------------------------------


def _py(code: str) -> subprocess.CompletedProcess:
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, cwd=REPO)


def test_the_stack_imports_with_no_shim():
    """The pinned torch and torchvision are built for each other: every client imports as its
    own docs say, in a fresh process, before anything of hierdctl's is imported."""
    p = _py(
        "import open_clip, torchvision, torch\n"
        "from torchvision.ops import nms\n"  # the op a torch/torchvision mismatch loses first
        "b = torch.tensor([[0., 0., 1., 1.], [0., 0., 1., 1.]])\n"
        "assert nms(b, torch.tensor([1., .5]), .5).tolist() == [0]\n"
        "from transformers import CLIPModel, pipeline\n"
        "from sentence_transformers import SentenceTransformer\n"
        "assert 'ViT-B-16' in open_clip.list_models()\n"
        "print('ok')\n"
    )
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-2000:]


def test_coca_sampling_is_enabled_whatever_was_imported_first():
    p = _py(
        "import open_clip.coca_model as coca\n"
        "from hierdctl.captioner import enable_coca_sampling\n"
        "enable_coca_sampling()\n"
        "assert coca._has_transformers and coca.GENERATION_TYPES['top_p'] is not None\n"
        "print('ok')\n"
    )
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-2000:]


def test_help_lists_the_commands():
    p = subprocess.run([sys.executable, "-m", "hierdctl.cli", "--help"], capture_output=True, text=True, timeout=60,
                       cwd=REPO, env=os.environ | {"COLUMNS": "120"})
    assert p.returncode == 0, p.stderr
    for cmd in ("cache-teacher", "cache-info", "distill", "export", "eval-retrieval"):
        assert cmd in p.stdout, cmd


def test_every_randaugment_op_replays_deterministically():
    from PIL import Image

    from hierdctl.images import RANDAUGMENT_OPS, apply_randaugment, draw_randaugment

    img = Image.open(io.BytesIO(image_bytes(3, size=(40, 40)))).convert("RGB")
    for name in RANDAUGMENT_OPS:
        op = ((name, {"Posterize": 5.0, "Solarize": 180.0, "Rotate": 15.0}.get(name, 0.25)),)
        a, b = apply_randaugment(img, op), apply_randaugment(img, op)
        assert a.size == img.size and a.tobytes() == b.tobytes(), name
        changed = a.tobytes() != img.tobytes()
        assert changed == (name != "Identity"), name
    draws = [draw_randaugment(np.random.default_rng(s), 2, 9) for s in range(50)]
    assert all(len(d) == 2 for d in draws) and draws[0] == draw_randaugment(np.random.default_rng(0), 2, 9)
    assert {n for d in draws for n, _ in d} == set(RANDAUGMENT_OPS)
    assert all(abs(v) == pytest.approx(9.0) for d in draws for n, v in d if n == "Rotate")  # 30° · 9/30

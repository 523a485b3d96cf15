"""cache-teacher end to end with the tiny random-init teacher (a local dir): what is cached
equals the teacher's own outputs under the same preprocessing; crops reapply exactly;
runs are deterministic and resumable; bad inputs are skipped, counted and logged; every
source form works; ranks (torchrun or job arrays) produce the same cache as one process."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from conftest import CAPTIONS, TINY_CFG, image_bytes, make_shards, make_tiny_model, save_local_dir, write_tar
from hierdctl import cache_format
from hierdctl.cli import app
from hierdctl.cluster import pool_clusters, spherical_kmeans
from hierdctl.errors import UserError
from hierdctl.images import View, apply_crop, decode_rgb
from hierdctl.sources import SourceOptions
from hierdctl.stages import cache_teacher as CT

BASE = dict(views=2, clusters=4, max_phrases=3, chunker="textblob", dtype="fp32", workers=0, quiet=True)


def _run(source: str, out: Path, teacher: str, **kw) -> dict:
    return CT.run(CT.CacheTeacherConfig(source=source, out=out, teacher=teacher, **(BASE | kw)))


def _samples(out: Path) -> list[cache_format.CachedSample]:
    m = json.loads((out / cache_format.MANIFEST_NAME).read_text())
    return [s for sh in m["shards"] for s in cache_format.read_shard(out / sh["name"])]


def _shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*.tar"))}


def _counts(m: dict) -> dict:
    keys = ("samples", "captions", "phrases", "skipped", "converted", "bytes", "shards_done", "shards_total", "complete")
    return {k: m[k] for k in keys}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return make_shards(tmp_path_factory.mktemp("ct") / "data", n_shards=2, per_shard=3)


@pytest.fixture(scope="module")
def ref(data, tiny_teacher, tmp_path_factory):
    """The reference cache (fp32, 2 views, K=4, 3 phrases) and the pixels the teacher saw."""
    out = tmp_path_factory.mktemp("ref") / "cache"
    manifest, seen = _run_seeing(data, out, tiny_teacher)
    return out, manifest, seen


def _run_seeing(source, out, teacher, **kw) -> tuple[dict, dict[str, torch.Tensor]]:
    """A cache-teacher run and, per image sha256, the (V,3,S,S) pixels the teacher was given."""
    seen: dict[str, torch.Tensor] = {}
    real = CT._Teacher.process

    def spy(self, items):
        for it in items:
            seen[it["meta"]["sha256"]] = it["pixels"].clone()
        return real(self, items)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(CT._Teacher, "process", spy)
        manifest = _run(source, out, teacher, **kw)
    return manifest, seen


@pytest.fixture(scope="module")
def enc(tiny_teacher):
    from hierdctl.specs import load_encoder

    return load_encoder(tiny_teacher, "cpu")


# ----------------------------------------------------------------------------------
# What is cached is what the teacher computes
# ----------------------------------------------------------------------------------


def test_manifest_counts(ref):
    out, m, _ = ref
    assert m["complete"] and m["samples"] == 6 and m["captions"] == 6 and m["skipped_total"] == 0
    assert m["schema_version"] == cache_format.SCHEMA_VERSION and m["format"] == cache_format.FORMAT_NAME
    assert m["teacher"]["embed_dim"] == 32 and m["teacher"]["patch_grid"] == [4, 4]
    assert m["config"]["teacher_fingerprint"] == m["teacher"]["fingerprint"]
    assert sorted(p.name for p in out.iterdir()) == [
        "cache-config.json", "manifest.json", "shard-00000.done.json", "shard-00000.tar",
        "shard-00001.done.json", "shard-00001.tar"]
    assert m["bytes"] == sum(p.stat().st_size for p in out.glob("shard-*.tar"))


def test_cached_embeddings_equal_the_teachers_own(ref, enc):
    out, _, _ = ref
    samples = _samples(out)
    assert [s.meta["key"] for s in samples] == [f"{i:09d}" for i in range(6)]
    for i, s in enumerate(samples):
        assert s.image == image_bytes(i) and s.meta["sha256"] == cache_format.sha256(image_bytes(i))
        img, _ = decode_rgb(s.image)
        views = [View.from_json(v) for v in s.meta["views"]]
        x = torch.stack([enc.eval_transform(img), apply_crop(img, views[1], enc.image_size, enc.mean, enc.std)])
        with torch.no_grad():
            want_img = F.normalize(enc.model.encode_image(x), dim=-1).numpy()
            want_txt = F.normalize(enc.model.encode_text(enc.tokenize(s.meta["captions"])), dim=-1).numpy()
            _, patches = enc.encode_image(x, want_patches=True)
        a = s.arrays
        assert a["img_emb"].shape == (2, 32) and a["txt_emb"].shape == (1, 32)
        np.testing.assert_allclose(a["img_emb"], want_img, rtol=0, atol=2e-6)
        np.testing.assert_allclose(a["txt_emb"], want_txt, rtol=0, atol=2e-6)
        # Clusters: spherical k-means of the teacher's patch tokens, pooled in the joint space.
        assign, counts = spherical_kmeans(patches, 4, (4, 4), iters=10)
        assert a["clu_assign"].shape == (2, 4, 4) and a["clu_assign"].dtype == np.uint8
        assert np.array_equal(a["clu_assign"].reshape(2, 16), assign.numpy())
        assert np.array_equal(a["clu_count"], counts.numpy()) and (a["clu_count"].sum(1) == 16).all()
        np.testing.assert_allclose(a["clu_emb"], pool_clusters(patches, assign, 4).numpy(), rtol=0, atol=2e-6)
        # Phrases: each chunked phrase's text embedding; padding rows are zero and masked.
        phrases = s.meta["phrases"][0]
        assert 1 <= len(phrases) <= 3 and a["phr_emb"].shape == (1, 3, 32)
        with torch.no_grad():
            want_phr = F.normalize(enc.model.encode_text(enc.tokenize(phrases)), dim=-1).numpy()
        np.testing.assert_allclose(a["phr_emb"][0, : len(phrases)], want_phr, rtol=0, atol=2e-6)
        assert a["phr_mask"][0].tolist() == [1] * len(phrases) + [0] * (3 - len(phrases))
        assert (a["phr_emb"][0, len(phrases):] == 0).all()
    assert samples[0].meta["phrases"] == [["a red circle", "a blue square"]]


def test_stored_crops_reproduce_the_teachers_pixels(ref, enc):
    out, _, seen = ref
    for s in _samples(out):
        img, _ = decode_rgb(s.image)
        pixels = seen[s.meta["sha256"]]  # (V,3,S,S) exactly what went into the teacher
        v0, v1 = (View.from_json(v) for v in s.meta["views"])
        assert v0.kind == "eval" and v1.kind == "crop"
        assert torch.equal(enc.eval_transform(img), pixels[0])
        # A student re-cuts the stored box from the original bytes: the same pixels, bit for bit.
        assert torch.equal(apply_crop(img, v1, enc.image_size, enc.mean, enc.std), pixels[1])
        x, y, w, h = v1.box
        assert 0 <= x and 0 <= y and x + w <= s.meta["size"][0] and y + h <= s.meta["size"][1]
        assert w * h >= 0.85 * s.meta["size"][0] * s.meta["size"][1]  # --crop-scale 0.9..1


def test_fp16_and_int8_stores_stay_close(ref, data, tiny_teacher, tmp_path):
    exact = _samples(ref[0])
    _run(data, tmp_path / "fp16", tiny_teacher, dtype="fp16")
    _run(data, tmp_path / "int8", tiny_teacher, dtype="int8")
    half, q = _samples(tmp_path / "fp16"), _samples(tmp_path / "int8")
    for e, h, i in zip(exact, half, q):
        assert e.meta == h.meta == i.meta
        for name in ("img_emb", "clu_emb", "txt_emb", "phr_emb"):
            np.testing.assert_allclose(h.arrays[name], e.arrays[name], rtol=0, atol=1e-3)
            row_max = np.abs(e.arrays[name]).max(-1, keepdims=True)
            assert (np.abs(i.arrays[name] - e.arrays[name]) <= row_max / 127 + 1e-7).all(), name
        assert np.array_equal(h.arrays["clu_assign"], e.arrays["clu_assign"])
    with open(tmp_path / "int8" / "shard-00000.tar", "rb") as f:
        raw = f.read()
    assert b".img_emb.scale.npy" in raw
    # At D=32 tar headers dominate the shard size; the payload itself is halved (sizes: docs/cache-format.md).


def test_token_store_shapes(data, tiny_teacher, tmp_path, enc):
    m = _run(data, tmp_path / "tok", tiny_teacher, store="tokens", dtype="fp16", views=3, store_images=False)
    s = _samples(tmp_path / "tok")[0]
    assert s.image is None and m["config"]["store_images"] is False
    G, D, L, W = 16, TINY_CFG["embed_dim"], 77, TINY_CFG["text_cfg"]["width"]
    assert s.arrays["img_tok"].shape == (3, G, D) and s.arrays["txt_tok"].shape == (1, L, W)
    assert s.arrays["img_emb"].shape == (3, D) and s.arrays["clu_emb"].shape == (3, 4, D)
    # The pooled clusters are made of these very tokens.
    pooled = pool_clusters(torch.from_numpy(s.arrays["img_tok"]), torch.from_numpy(s.arrays["clu_assign"].reshape(3, G)), 4)
    np.testing.assert_allclose(pooled.numpy(), s.arrays["clu_emb"], rtol=0, atol=3e-3)


# ----------------------------------------------------------------------------------
# Determinism, resume, identity
# ----------------------------------------------------------------------------------


def test_same_run_twice_is_byte_identical(ref, data, tiny_teacher, tmp_path):
    m = _run(data, tmp_path / "again", tiny_teacher)
    assert _shard_bytes(tmp_path / "again") == _shard_bytes(ref[0])
    assert _counts(m) == _counts(ref[1])


def test_dataloader_worker_gives_the_same_cache(ref, data, tiny_teacher, tmp_path):
    m = _run(data, tmp_path / "w1", tiny_teacher, workers=1)
    assert _shard_bytes(tmp_path / "w1") == _shard_bytes(ref[0])
    assert _counts(m) == _counts(ref[1])


def test_resume_after_a_kill_equals_the_uninterrupted_run(ref, data, tiny_teacher, tmp_path, monkeypatch):
    out = tmp_path / "killed"
    real = cache_format.write_shard

    def finish_then_die(out, index, *a, **k):
        stats = real(out, index, *a, **k)
        if index == 0:
            raise KeyboardInterrupt  # killed right after the first shard's done-marker
        return stats

    monkeypatch.setattr(cache_format, "write_shard", finish_then_die)
    with pytest.raises(KeyboardInterrupt):
        _run(data, out, tiny_teacher)
    monkeypatch.setattr(cache_format, "write_shard", real)
    assert (out / "shard-00000.done.json").exists() and not (out / "shard-00001.tar").exists()
    assert not (out / "manifest.json").exists()
    with pytest.raises(UserError, match="unfinished cache"):
        cache_format.open_cache(out)
    (out / "shard-00001.tar.tmp4242").write_bytes(b"half a shard from the killed run")
    m = _run(data, out, tiny_teacher)
    assert m["this_run"]["shards_resumed"] == 1 and m["this_run"]["samples"] == 3
    assert _shard_bytes(out) == _shard_bytes(ref[0]) and _counts(m) == _counts(ref[1])
    assert not list(out.glob("*.tmp*"))
    keys = [s.meta["key"] for s in _samples(out)]
    assert sorted(keys) == [f"{i:09d}" for i in range(6)]  # every sample exactly once

    # A shard whose size disagrees with its done-marker (torn write) is redone, not trusted.
    (out / "shard-00001.tar").write_bytes((out / "shard-00001.tar").read_bytes()[:1024])
    m = _run(data, out, tiny_teacher)
    assert m["this_run"]["shards_resumed"] == 1 and _shard_bytes(out) == _shard_bytes(ref[0])
    # Nothing left to do: a rerun keeps everything.
    m = _run(data, out, tiny_teacher)
    assert m["this_run"]["shards_resumed"] == 2 and m["this_run"]["samples"] == 0 and _counts(m) == _counts(ref[1])


def test_other_teacher_or_setting_is_refused_and_overwrite_starts_over(ref, data, tmp_path, tiny_teacher):
    out = tmp_path / "c"
    shutil.copytree(ref[0], out)
    other = save_local_dir(make_tiny_model(seed=1), TINY_CFG, tmp_path / "other")
    with pytest.raises(UserError, match="another configuration.*teacher") as e:
        _run(data, out, f"local-dir:{other}")
    assert str(e.value).startswith("--out:") and "--overwrite" in str(e.value)
    with pytest.raises(UserError, match="clusters"):
        _run(data, out, tiny_teacher, clusters=3)
    with pytest.raises(UserError, match="dtype"):
        _run(data, out, tiny_teacher, dtype="fp16")
    assert _shard_bytes(out) == _shard_bytes(ref[0])  # refused runs touched nothing
    m = _run(data, out, f"local-dir:{other}", clusters=3, overwrite=True)
    assert m["this_run"]["shards_resumed"] == 0 and m["config"]["clusters"]["k"] == 3
    assert m["teacher"]["fingerprint"] != ref[1]["teacher"]["fingerprint"]
    assert _samples(out)[0].arrays["clu_emb"].shape == (2, 3, 32)
    old = json.loads((out / "cache-config.json").read_text())
    old["schema_version"] = 0
    (out / "cache-config.json").write_text(json.dumps(old))
    with pytest.raises(UserError, match="schema version 0"):
        _run(data, out, f"local-dir:{other}", clusters=3)


def test_random_init_teacher_is_the_same_model_in_every_process(data, tmp_path):
    # `open_clip:ARCH` as a teacher (bootstrap caches, benchmarks) is seeded, so a rerun in a
    # new process resumes instead of being refused as "another teacher" — and the caller's
    # RNG is left as it was.
    from hierdctl.specs import load_encoder

    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = load_encoder("open_clip:tiny-test").fingerprint()
    assert torch.equal(torch.rand(3), before)
    torch.manual_seed(999)
    assert load_encoder("open_clip:tiny-test").fingerprint() == a
    out = tmp_path / "rand"
    cmd = [sys.executable, "-m", "hierdctl.cli", "cache-teacher", data, "--out", str(out), "--teacher",
           "open_clip:tiny-test", "--views", "1", "--clusters", "0", "--max-phrases", "0", "--workers", "0", "--quiet"]
    for _ in range(2):  # the second run, in a fresh process, resumes every shard
        p = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
        assert p.returncode == 0, p.stderr[-2000:]
    m = json.loads((out / "manifest.json").read_text())
    assert m["teacher"]["fingerprint"] == a and m["complete"]


# ----------------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------------


def _img(mode: str, fmt: str, size=(48, 40)) -> bytes:
    if mode == "I;16":
        a = (np.arange(size[0] * size[1]).reshape(size[1], size[0]) * 37 % 65536).astype(np.uint16)
        img = Image.fromarray(a)
    else:
        img = Image.open(io.BytesIO(image_bytes(7, size))).convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def test_bad_samples_are_skipped_counted_and_logged(tmp_path, tiny_teacher):
    good = image_bytes(1)
    jpeg = image_bytes(2)
    d = tmp_path / "data"
    d.mkdir()
    write_tar(d / "00000.tar", [
        {"key": "good", "jpg": good, "txt": CAPTIONS[0]},
        {"key": "corrupt", "jpg": b"these bytes are no image format at all", "txt": CAPTIONS[1]},
        {"key": "truncated", "jpg": jpeg[: len(jpeg) // 2], "txt": CAPTIONS[1]},
        {"key": "empty", "jpg": good, "txt": "  \n "},
        {"key": "undecodable", "jpg": good, "txt": b"\xff\xfe\xfd"},
        {"key": "gray", "jpg": _img("L", "JPEG"), "txt": CAPTIONS[2]},
        {"key": "cmyk", "jpg": _img("CMYK", "JPEG"), "txt": CAPTIONS[3]},
        {"key": "rgba", "png": _img("RGBA", "PNG"), "txt": CAPTIONS[4]},
        {"key": "deep", "png": _img("I;16", "PNG"), "txt": CAPTIONS[5]},
        {"key": "bomb", "png": _img("RGB", "PNG", size=(200, 200)), "txt": CAPTIONS[0]},
    ])
    full = write_tar(d / "00001.tar", [{"key": f"t{i}", "jpg": image_bytes(10 + i), "txt": CAPTIONS[i]} for i in range(3)])
    with tarfile.open(full) as tf:
        last = tf.getmember("t2.jpg")
    full.write_bytes(full.read_bytes()[: last.offset_data + last.size // 2])  # the last image is cut off mid-data
    log = tmp_path / "skipped.jsonl"
    m = _run(str(d), tmp_path / "cache", tiny_teacher, max_pixels=10_000, log_skipped=log)
    assert m["complete"] and m["samples"] == 5 + 2
    assert m["skipped"] == {"corrupt_image": 1, "decompression_bomb": 1, "empty_caption": 1, "truncated_image": 1,
                            "truncated_tar": 1, "undecodable_caption": 1}
    assert m["skipped_total"] == 6
    assert m["converted"] == {"CMYK": 1, "I;16": 1, "L": 1, "RGBA": 1}
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    assert {(r["key"], r["reason"]) for r in logged} == {
        ("corrupt", "corrupt_image"), ("truncated", "truncated_image"), ("empty", "empty_caption"),
        ("undecodable", "undecodable_caption"), ("bomb", "decompression_bomb"), ("t2", "truncated_tar")}
    assert all(r["shard"].startswith("shard-") for r in logged)
    by_key = {s.meta["key"]: s for s in _samples(tmp_path / "cache")}
    assert set(by_key) == {"good", "gray", "cmyk", "rgba", "deep", "t0", "t1"}
    assert by_key["deep"].meta["converted_from"] == "I;16" and by_key["deep"].meta["image_ext"] == "png"
    assert by_key["good"].meta["converted_from"] is None
    assert by_key["rgba"].image == _img("RGBA", "PNG")  # the original bytes are kept, unconverted


# ----------------------------------------------------------------------------------
# Source forms, the CLI, ranks
# ----------------------------------------------------------------------------------


def _source(kind: str, root: Path) -> tuple[str, SourceOptions, int, dict]:
    """(spec, options, valid samples, skipped) for each source form."""
    if kind in ("directory", "single-tar"):
        make_shards(root / "shards", n_shards=2, per_shard=2)
        spec = str(root / "shards") if kind == "directory" else str(root / "shards" / "00001.tar")
        return spec, SourceOptions(), 4 if kind == "directory" else 2, {}
    (root / "img").mkdir(parents=True)
    for i in range(3):
        (root / "img" / f"{i}.png").write_bytes(image_bytes(i, fmt="PNG"))
    if kind == "karpathy":
        images = [{"filename": f"{i}.png", "imgid": i, "split": "test",
                   "sentences": [{"raw": CAPTIONS[i]}, {"raw": CAPTIONS[i + 1]}]} for i in range(3)]
        images.append({"filename": "gone.png", "imgid": 9, "split": "test", "sentences": [{"raw": "x"}]})
        (root / "dataset_coco.json").write_text(json.dumps({"images": images}))
        opts = SourceOptions(image_root=str(root / "img"), split="test", rows_per_shard=2)
        return str(root / "dataset_coco.json"), opts, 3, {"missing_file": 1}
    rows = [(f"img/{i}.png", [CAPTIONS[i], CAPTIONS[i + 2]] if kind == "jsonl" else CAPTIONS[i]) for i in range(3)]
    rows.append(("img/gone.png", "a missing file"))
    if kind == "jsonl":
        p = root / "pairs.jsonl"
        p.write_text("".join(json.dumps({"image": f, "caption": c}) + "\n" for f, c in rows))
    else:
        p = root / "pairs.csv"
        p.write_text("image,caption\n" + "".join(f'{f},"{c}"\n' for f, c in rows))
    return str(p), SourceOptions(rows_per_shard=2), 3, {"missing_file": 1}


@pytest.mark.parametrize("kind", ["directory", "single-tar", "csv", "jsonl", "karpathy"])
def test_every_source_form(kind, tmp_path, tiny_teacher):
    spec, opts, n, skipped = _source(kind, tmp_path)
    m = _run(spec, tmp_path / "cache", tiny_teacher, source_options=opts, clusters=2, max_phrases=1)
    assert m["complete"] and m["samples"] == n and m["skipped"] == skipped
    samples = _samples(tmp_path / "cache")
    assert len(samples) == n
    if kind in ("jsonl", "karpathy"):
        assert all(len(s.meta["captions"]) == 2 and s.arrays["txt_emb"].shape == (2, 32) for s in samples)
        assert all(s.arrays["phr_emb"].shape == (2, 1, 32) for s in samples)
    if kind not in ("directory", "single-tar"):
        assert m["shards_total"] == 2 and samples[0].meta["image_ext"] == "png"


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_bad_sources_exit_2_with_one_message(tmp_path, tiny_teacher):
    r = _cli("cache-teacher", tmp_path / "nowhere.tar", "--out", tmp_path / "c", "--teacher", tiny_teacher, "--quiet")
    assert r.exit_code == 2 and "does not exist" in r.output
    assert len([line for line in r.output.splitlines() if line.strip()]) == 1
    bad = write_tar(tmp_path / "bad.tar", [{"key": f"k{i}", "jpg": b"garbage", "txt": "x"} for i in range(2)])
    r = _cli("cache-teacher", bad, "--out", tmp_path / "c2", "--teacher", tiny_teacher, "--quiet", "--workers", "0",
             "--chunker", "textblob")
    assert r.exit_code == 2 and "no valid sample" in r.output and "corrupt_image" in r.output
    assert len([line for line in r.output.splitlines() if line.strip()]) == 1
    r = _cli("cache-teacher", bad, "--out", tmp_path / "c3", "--teacher", "local-dir:" + str(tmp_path), "--quiet")
    assert r.exit_code == 2 and "--teacher" in r.output
    r = _cli("cache-teacher", bad, "--out", tmp_path / "c4", "--teacher", tiny_teacher, "--clusters", "300")
    assert r.exit_code == 2 and "--clusters" in r.output


def test_cache_info(ref, tmp_path):
    r = CliRunner().invoke(app, ["cache-info", str(ref[0]), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["schema_version"] == cache_format.SCHEMA_VERSION and info["samples"] == 6 and info["skipped"] == {}
    assert info["teacher"]["spec"] == ref[1]["teacher"]["spec"] and info["teacher"]["fingerprint"]
    r = _cli("cache-info", ref[0])
    assert r.exit_code == 0 and "samples" in r.output
    r = _cli("cache-info", tmp_path)
    assert r.exit_code == 2 and "not a finished hierdctl cache" in r.output


def test_job_array_ranks_merge_into_one_cache(ref, data, tiny_teacher, tmp_path):
    out = tmp_path / "array"
    m0 = _run(data, out, tiny_teacher, rank=0, world_size=2)
    assert not m0["complete"] and m0["shards_done"] == 1 and m0["samples"] == 3
    m1 = _run(data, out, tiny_teacher, rank=1, world_size=2)
    assert m1["complete"] and _counts(m1) == _counts(ref[1])
    assert _shard_bytes(out) == _shard_bytes(ref[0])
    with pytest.raises(UserError, match="rank 2 is not within world size 2"):
        _run(data, out, tiny_teacher, rank=2, world_size=2)


@pytest.mark.dist
@pytest.mark.slow
def test_torchrun_two_processes_match_one(ref, data, tiny_teacher, tmp_path):
    args = ["cache-teacher", data, "--out", str(tmp_path / "ddp"), "--teacher", tiny_teacher, "--views", "2",
            "--clusters", "4", "--max-phrases", "3", "--chunker", "textblob", "--dtype", "fp32", "--workers", "0",
            "--device", "cpu", "--quiet"]
    env = os.environ | {"OMP_NUM_THREADS": "1", "HIERDCTL_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "hierdctl.cli"]
    p = subprocess.run(cmd + args, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    m = json.loads((tmp_path / "ddp" / "manifest.json").read_text())
    assert _counts(m) == _counts(ref[1])
    a, b = _samples(tmp_path / "ddp"), _samples(ref[0])
    assert [s.meta for s in a] == [s.meta for s in b]
    for x, y in zip(a, b):
        assert x.arrays.keys() == y.arrays.keys()
        for k in x.arrays:
            np.testing.assert_allclose(x.arrays[k], y.arrays[k], rtol=0, atol=1e-5, err_msg=k)


def test_randaugment_views_replay_bit_for_bit_at_any_resolution(data, tiny_teacher, enc, tmp_path):
    """--augment rrc+flip+randaugment: each crop view stores its (op, value) draws; re-applying
    the stored view to the original bytes gives the teacher's pixels exactly, and the same view
    at another resolution (a student's) is the same geometry."""
    from hierdctl.images import RANDAUGMENT_OPS, apply_view

    out = tmp_path / "ra"
    m, seen = _run_seeing(data, out, tiny_teacher, views=4, augment="rrc+flip+randaugment", randaugment=(2, 9))
    assert m["config"]["augment"]["ops"] == "rrc+flip+randaugment" and m["config"]["augment"]["randaugment"] == [2, 9]
    drawn = set()
    for s in _samples(out):
        img, _ = decode_rgb(s.image)
        views = [View.from_json(v) for v in s.meta["views"]]
        assert views[0].ops == () and all(len(v.ops) == 2 for v in views[1:])
        for i, v in enumerate(views):
            got = apply_view(img, v, enc.image_size, enc.mean, enc.std, enc.eval_transform)
            assert torch.equal(got, seen[s.meta["sha256"]][i])  # bit for bit
            drawn |= {name for name, _ in v.ops}
        big = apply_crop(img, views[1], 64, enc.mean, enc.std)  # a student at twice the resolution
        small = torch.nn.functional.avg_pool2d(big[None], 2)[0]
        assert (small - seen[s.meta["sha256"]][1]).abs().mean() < 0.25  # the same view, resampled
    assert drawn <= set(RANDAUGMENT_OPS) and len(drawn) >= 4
    # Without randaugment the views carry no ops (and the cache's bytes are today's).
    plain = _samples(tmp_path / "ra") and _run(data, tmp_path / "plain", tiny_teacher)
    assert all("ops" not in v for s in _samples(tmp_path / "plain") for v in s.meta["views"]) and plain

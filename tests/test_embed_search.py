"""embed → index → search on a real (tiny) collection: the folder format, skip-and-count,
caption-less and text-only collections, resume after kill -9, every index kind and its
measured recall, search against brute force, the model check, bad input exiting 2."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import CAPTIONS, TINY_CFG, image_bytes, make_tiny_model, save_local_dir, write_tar
from hierdctl import embeddings_format as EF
from hierdctl import index_format as IF
from hierdctl.cli import app
from hierdctl.configs import EmbedConfig, IndexConfig, SearchConfig
from hierdctl.errors import UserError
from hierdctl.stages import embed as E
from hierdctl.stages import index as I
from hierdctl.stages import search as S

REPO = Path(__file__).resolve().parents[1]


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _one_line_error(r, *needles: str) -> str:
    assert r.exit_code == 2, (r.exit_code, r.output[-2000:], r.exception)
    assert "Traceback" not in r.output, r.output
    lines = [line for line in r.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1, r.output
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------------
# A collection: 3 clean shards, one with every kind of trouble, one cut short
# ----------------------------------------------------------------------------------


def _sample(i: int, caption: str | None = None, **extra) -> dict:
    s = {"key": f"{i:06d}", "jpg": image_bytes(i)}
    if caption is not None:
        s["txt"] = caption
    return s | extra


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("collection")
    i = 0
    for s in range(3):
        write_tar(d / f"{s:05d}.tar", [_sample(i + j, CAPTIONS[(i + j) % 6] + f" {i + j}") for j in range(4)])
        i += 4
    write_tar(d / "00003.tar", [
        _sample(20),  # no caption at all
        _sample(21, "   "),  # an empty caption
        {"key": "000022", "jpg": b"not a jpeg", "txt": "a broken image"},  # corrupt
        _sample(23, "the same image as sample 0", jpg=image_bytes(0)),  # duplicate image bytes
        {"key": "000001", "jpg": image_bytes(24), "txt": "a key seen before"},  # duplicate key
        {"key": "000025", "txt": "a caption without its image"},  # no image
    ])
    full = (d / "00000.tar").read_bytes()
    (d / "00004.tar").write_bytes(full[: len(full) // 2])  # cut short: its first samples, then truncated_tar
    return d


@pytest.fixture(scope="module")
def other_model(tmp_path_factory) -> str:
    return "local-dir:" + str(save_local_dir(make_tiny_model(seed=1), TINY_CFG, tmp_path_factory.mktemp("m") / "s1"))


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory) -> str:
    cfg = TINY_CFG | {"embed_dim": 16}
    return "local-dir:" + str(save_local_dir(make_tiny_model(cfg), cfg, tmp_path_factory.mktemp("w") / "w16"))


def _embed(source, out, model, **kw) -> dict:
    kw = {"device": "cpu", "quiet": True, "workers": 0, "batch_size": 3} | kw
    return E.run(EmbedConfig(source=str(source), model=model, out=Path(out), **kw))


@pytest.fixture(scope="module")
def embedded(collection, tiny_teacher, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("emb") / "emb"
    return out, _embed(collection, out, tiny_teacher)


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file() and p.name.startswith("shard-")}


# ----------------------------------------------------------------------------------
# embed
# ----------------------------------------------------------------------------------


def test_embed_counts_every_kind_of_trouble_and_keeps_caption_less_images(embedded, collection):
    out, m = embedded
    c = m["counts"]
    cut = m["shards"][4]["rows"]  # what the cut shard gave before it broke (at least its first sample)
    assert 1 <= cut < 4
    assert c["rows"] == 12 + 4 + cut  # 12 clean, 4 of shard 3 (no caption, empty, duplicate image, duplicate key)
    assert c["captionless"] == {"empty_caption": 1, "missing_caption": 1} and c["captionless_total"] == 2
    assert c["skipped"] == {"corrupt_image": 1, "missing_image": 1, "truncated_tar": 1} and c["skipped_total"] == 3
    assert c["texts"] == 12 + 2 + cut  # every caption once; the caption-less images have none
    # Keys 000001 and the cut shard's keys (a copy of shard 0) repeat; images of 0 (twice) and the copies repeat.
    assert c["duplicate_keys"] == 1 + cut and c["duplicate_images"] == 1 + cut
    assert m["complete"] and m["shards_done"] == m["shards_total"] == 5
    done = json.loads((out / "shard-00003.done.json").read_text())
    assert {(s["key"], s["reason"]) for s in done["skipped_samples"]} == {("000022", "corrupt_image"),
                                                                          ("000025", "missing_image")}


def test_embed_shards_hold_the_models_embeddings_keys_paths_and_captions(embedded, tiny_teacher, collection):
    from PIL import Image

    from hierdctl.specs import load_encoder

    out, m = embedded
    rows = json.loads((out / "shard-00003.rows.json").read_text())
    assert rows["keys"] == ["000020", "000021", "000023", "000001"]
    assert rows["captions"] == [[], [], ["the same image as sample 0"], ["a key seen before"]]
    assert rows["paths"][0] == f"{collection / '00003.tar'}#000020.jpg"
    img = np.load(out / "shard-00003.image.npy", allow_pickle=False)
    txt = np.load(out / "shard-00003.text.npy", allow_pickle=False)
    assert img.dtype == np.float16 and img.shape == (4, 32) and txt.shape == (2, 32)
    np.testing.assert_array_equal(np.load(out / "shard-00003.text_row.npy", allow_pickle=False), [2, 3])
    # The same numbers as the encoder gives directly (its own transform, its embedding).
    enc = load_encoder(tiny_teacher)
    with torch.no_grad():
        x = torch.stack([enc.eval_transform(Image.open(io.BytesIO(image_bytes(i))).convert("RGB"))
                         for i in (20, 21, 0, 24)])
        want_img = enc.encode_image(x)[0].numpy()
        want_txt = enc.encode_text(enc.tokenize(["the same image as sample 0", "a key seen before"]))[0].numpy()
    np.testing.assert_allclose(img.astype(np.float32), want_img, atol=2e-3)
    np.testing.assert_allclose(txt.astype(np.float32), want_txt, atol=2e-3)
    assert m["model"]["fingerprint"] == enc.fingerprint() and m["model"]["embed_dim"] == 32


def test_embed_rerun_keeps_finished_shards_and_refuses_other_settings(embedded, collection, tiny_teacher, other_model,
                                                                     tmp_path):
    out, m = embedded
    before = _files(out)
    again = _embed(collection, out, tiny_teacher)
    assert again["this_run"]["shards"] == 0 and again["this_run"]["shards_resumed"] == 5
    assert _files(out) == before and again["content_digest"] == m["content_digest"]
    for kw, needle in (({"model": other_model}, "model"), ({"dtype": "fp32"}, "dtype"),
                       ({"modality": "image"}, "modality")):
        with pytest.raises(UserError, match="another configuration") as e:
            _embed(collection, out, **({"model": tiny_teacher} | kw))
        assert e.value.where == "--out" and needle in str(e.value)
    # A folder hierdctl did not write is refused, even with --overwrite, and left alone.
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    r = _cli("embed", collection, "--model", tiny_teacher, "--out", theirs, "--overwrite", "--quiet", "--device", "cpu")
    _one_line_error(r, "--out", "not a hierdctl embeddings folder")
    assert sorted(p.name for p in theirs.iterdir()) == ["notes.txt"]


def test_embed_overwrite_removes_only_what_embed_wrote(collection, tiny_teacher, other_model, tmp_path):
    out = tmp_path / "emb"
    _embed(collection / "00000.tar", out, tiny_teacher)
    (out / "index").mkdir()
    (out / "index" / "keep.txt").write_text("an index folder of the user's")
    m = _embed(collection / "00001.tar", out, other_model, overwrite=True)
    assert m["model"]["spec"] == other_model and m["counts"]["rows"] == 4
    assert (out / "index" / "keep.txt").exists()
    assert json.loads((out / "shard-00000.rows.json").read_text())["keys"] == ["000004", "000005", "000006", "000007"]


def test_an_image_collection_without_captions_embeds_and_eval_retrieval_still_refuses_it(tmp_path, tiny_teacher):
    for i in range(5):
        (tmp_path / f"{i}.png").write_bytes(image_bytes(i, fmt="PNG"))
    (tmp_path / "images.csv").write_text("image\n" + "".join(f"{i}.png\n" for i in range(5)))
    m = _embed(tmp_path / "images.csv", tmp_path / "emb", tiny_teacher, modality="image")
    assert m["counts"]["rows"] == 5 and m["counts"]["texts"] == 0
    assert m["counts"]["captionless"] == {"missing_caption": 5}
    assert not list((tmp_path / "emb").glob("*.text.npy"))
    rows = json.loads((tmp_path / "emb" / "shard-00000.rows.json").read_text())
    assert rows["paths"] == [str(tmp_path / f"{i}.png") for i in range(5)]
    r = _cli("eval-retrieval", tmp_path / "images.csv", "--model", tiny_teacher, "--quiet", "--device", "cpu")
    _one_line_error(r, "--caption-col", "column 'caption' not found")


def test_a_text_collection_embeds_without_reading_images_and_is_searched_by_caption(tmp_path, tiny_teacher):
    lines = [json.dumps({"caption": c, "image": "never-read.jpg"}) for c in CAPTIONS] + [json.dumps({"caption": ""})]
    (tmp_path / "texts.jsonl").write_text("\n".join(lines) + "\n")
    m = _embed(tmp_path / "texts.jsonl", tmp_path / "emb", tiny_teacher, modality="text")
    assert m["counts"]["rows"] == 6 and m["counts"]["texts"] == 6 and m["counts"]["skipped"] == {"empty_caption": 1}
    assert not list((tmp_path / "emb").glob("*.image.npy"))
    idx = I.run(IndexConfig(embeddings=tmp_path / "emb", quiet=True))
    assert idx["over"] == "text" and idx["rows"] == 6
    res = S.run(SearchConfig(index=tmp_path / "emb" / "index", texts=[CAPTIONS[2]], k=2, device="cpu", quiet=True))
    top = res["queries"][0]["results"][0]
    assert top["caption"] == CAPTIONS[2] and top["score"] == pytest.approx(1.0, abs=2e-3) and top["key"] == "000000002"
    r = _cli("index", tmp_path / "emb", "--over", "image", "--out", tmp_path / "i2", "--quiet")
    _one_line_error(r, "--over", "hold text rows only")


# ----------------------------------------------------------------------------------
# embed: killed, then rerun
# ----------------------------------------------------------------------------------

BASE_ENV = {"HF_HUB_OFFLINE": "1", "HIERDCTL_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["embed:unit-done:1", "write:shard-00002.text.npy:before-rename"])
def test_embed_killed_then_rerun_completes_and_redoes_only_unfinished_shards(collection, tiny_teacher, embedded,
                                                                          tmp_path, fault):
    out = tmp_path / "emb"
    args = ["embed", str(collection), "--model", tiny_teacher, "--out", str(out), "--device", "cpu", "--workers", "0",
            "--batch-size", "3", "--quiet"]
    p = subprocess.run([sys.executable, "-m", "hierdctl.cli", *args], cwd=REPO, capture_output=True, text=True,
                       env=os.environ | BASE_ENV | {"HIERDCTL_FAULT": fault}, timeout=300)
    assert p.returncode == -9, (p.returncode, p.stderr[-2000:])
    assert {p.name for p in out.glob("*.done.json")} == {"shard-00000.done.json", "shard-00001.done.json"}
    assert not (out / EF.MANIFEST_NAME).exists()
    kept = {k: v for k, v in _files(out).items() if k.startswith(("shard-00000.", "shard-00001."))}
    leftovers = [p.name for p in out.iterdir() if ".tmp" in p.name]
    assert bool(leftovers) == ("before-rename" in fault)
    m = _embed(collection, out, tiny_teacher)
    assert m["this_run"]["shards_resumed"] == 2 and m["this_run"]["shards"] == 3
    assert {k: v for k, v in _files(out).items() if k in kept} == kept  # finished shards untouched
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]
    ref_out, ref = embedded
    assert m["counts"] == ref["counts"]
    for s in ref["shards"]:  # the same vectors as an uninterrupted run (another process: within fp16 rounding)
        stem = EF.shard_stem(s["index"])
        for what in ("image", "text"):
            a = np.load(out / f"{stem}.{what}.npy").astype(np.float32)
            b = np.load(ref_out / f"{stem}.{what}.npy").astype(np.float32)
            np.testing.assert_allclose(a, b, atol=2e-3)
        assert (out / f"{stem}.rows.json").read_bytes() == (ref_out / f"{stem}.rows.json").read_bytes()


def test_a_damaged_finished_shard_is_redone_on_rerun(collection, tiny_teacher, tmp_path):
    out = tmp_path / "emb"
    _embed(collection / "00000.tar", out, tiny_teacher)
    good = (out / "shard-00000.image.npy").read_bytes()
    (out / "shard-00000.image.npy").write_bytes(good[:-8] + b"\x00" * 8)  # same size, other bytes
    m = _embed(collection / "00000.tar", out, tiny_teacher, quiet=False)
    assert m["this_run"]["shards"] == 1
    assert any("does not match its recorded sha256" in n for n in m["this_run"]["notes"])
    assert (out / "shard-00000.image.npy").read_bytes() == good


# ----------------------------------------------------------------------------------
# index
# ----------------------------------------------------------------------------------


class _Units:
    """A stand-in source for write_manifest: units 0..n-1."""

    def __init__(self, n):
        self.units = [type("U", (), {"index": i, "label": f"synthetic-{i}"})() for i in range(n)]

    def describe(self):
        return {"kind": "synthetic", "units": len(self.units)}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    """3,000 clustered unit vectors (D = 32) in 3 shards, written with the embeddings format."""
    out = tmp_path_factory.mktemp("syn") / "emb"
    out.mkdir()
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((60, 32))
    x = centres[rng.integers(0, 60, 3000)] + 0.3 * rng.standard_normal((3000, 32))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    identity = {"modality": "image", "dtype": "fp32"}
    for s in range(3):
        part = x[s * 1000 : (s + 1) * 1000]
        keys = [f"k{s}-{i}" for i in range(1000)]
        EF.write_shard(out, s, f"synthetic-{s}", image=part, text=None, text_row=np.zeros(0, np.int64),
                       hashes=np.asarray([[EF.key_hash(k), EF.key_hash(k + "img")] for k in keys], np.uint64),
                       rows={"keys": keys, "paths": keys, "captions": [[] for _ in keys]}, skipped=[], captionless={})
    EF.write_manifest(out, identity, {"spec": "synthetic", "fingerprint": "f" * 64, "embed_dim": 32}, _Units(3), 0.0)
    np.save(out.parent / "x.npy", x)
    return out


def test_exact_neighbours_and_recall_against_numpy_brute_force(synthetic):
    emb = EF.Embeddings(synthetic)
    x = np.load(synthetic.parent / "x.npy")
    q = x[[5, 1500, 2999]]
    scores, ids = IF.exact_neighbours(emb, "image", q, 11)
    brute = np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :11]
    np.testing.assert_array_equal(ids, brute)
    np.testing.assert_allclose(scores, np.take_along_axis(q @ x.T, brute, 1), rtol=1e-5)
    self_ids = np.array([5, 1500, 2999])
    assert IF.recall_vs_exact(ids, ids, self_ids, 10) == 1.0
    shifted = ids.copy()
    shifted[:, 1:6] = 9999  # 5 of each query's 10 neighbours lost
    assert IF.recall_vs_exact(shifted, ids, self_ids, 10) == pytest.approx(0.5)


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw", "pq"])
def test_every_index_kind_is_sized_measured_and_searches_like_faiss_itself(synthetic, tmp_path, kind):
    import faiss

    m = I.run(IndexConfig(embeddings=synthetic, out=tmp_path / kind, index_type=kind, quiet=True, recall_queries=200))
    x = np.load(synthetic.parent / "x.npy")
    assert m["rows"] == 3000 and m["dim"] == 32 and m["exact"] == (kind == "flat")
    r = m["recall"]
    if kind == "flat":
        assert r == {"k": 10, "value": 1.0, "measured": False, "queries": 0, "why": "exact index"}
    else:
        assert r["measured"] and r["queries"] == 200 and 0.0 <= r["value"] <= 1.0
    if kind == "ivf":
        assert m["params"]["nlist"] == IF.ivf_nlist(3000) == 76 and m["params"]["nprobe"] == 9
        assert m["params"]["train_rows"] == 2800  # the held-out queries are not trained on
        assert r["value"] > 0.7
    if kind == "hnsw":
        assert r["value"] > 0.9
    if kind == "pq":
        assert (m["params"]["m"], m["params"]["nbits"]) == (8, 6)  # 32 dims, 3000 rows: 2^6 ≤ 3000/39
        assert r["value"] < 1.0  # compression loses neighbours
    # Read back, the index answers as FAISS answers for the same index on the same vectors.
    idx = IF.OpenIndex(tmp_path / kind)
    q = x[:50]
    s, ids = idx.search(q, 10)
    s2, ids2 = faiss.read_index(str(tmp_path / kind / "index.faiss")), None
    IF.set_search_params(s2, kind, m["params"])
    _, ids2 = s2.search(q, 10)
    np.testing.assert_array_equal(ids, ids2)
    if kind == "flat":
        np.testing.assert_array_equal(ids, np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :10])
        np.testing.assert_allclose(s[:, 0], 1.0, atol=1e-5)


def test_index_replaces_only_its_own_folder(synthetic, tmp_path):
    out = tmp_path / "idx"
    I.run(IndexConfig(embeddings=synthetic, out=out, quiet=True))
    r = _cli("index", synthetic, "--out", out, "--quiet")
    _one_line_error(r, "--out", "--overwrite")
    I.run(IndexConfig(embeddings=synthetic, out=out, index_type="hnsw", overwrite=True, quiet=True))
    assert json.loads((out / "index.json").read_text())["kind"] == "hnsw"
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "index.json").write_text("{}")
    _one_line_error(_cli("index", synthetic, "--out", theirs, "--overwrite", "--quiet"), "--out",
                    "not written by hierdctl")


# ----------------------------------------------------------------------------------
# search
# ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def indexed(embedded) -> Path:
    out, _ = embedded
    I.run(IndexConfig(embeddings=out, quiet=True))
    return out / "index"


def _all_rows(emb_dir: Path) -> tuple[np.ndarray, list[dict]]:
    e = EF.Embeddings(emb_dir)
    x = np.concatenate([v for _, v in e.vectors("image")])
    return x, [e.lookup(i, "image") for i in range(len(x))]


def test_search_by_text_and_image_equals_brute_force(indexed, embedded, tiny_teacher, collection):
    from hierdctl.specs import load_encoder

    x, rows = _all_rows(embedded[0])
    res = S.run(SearchConfig(index=indexed, texts=["a black cat sleeping on a sofa 5"], k=5, device="cpu", quiet=True))
    enc = load_encoder(tiny_teacher)
    with torch.no_grad():
        q = enc.encode_text(enc.tokenize(["a black cat sleeping on a sofa 5"]))[0].numpy()[0]
    scores = x @ q
    want = np.sort(scores)[::-1][:5]  # the collection holds duplicate images: ties may come in either order
    got = res["queries"][0]["results"]
    assert [r["rank"] for r in got] == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([r["score"] for r in got], want, atol=1e-4)
    np.testing.assert_allclose([r["score"] for r in got], scores[[r["row"] for r in got]], atol=1e-4)
    assert len({r["row"] for r in got}) == 5
    assert [r["key"] for r in got] == [rows[r["row"]]["key"] for r in got]
    assert got[0]["captions"] == rows[got[0]["row"]]["captions"] and got[0]["path"].endswith(f"#{got[0]['key']}.jpg")
    # An image of the collection finds itself first (and its duplicate, sample 23, beside it).
    img = embedded[0].parent / "q.jpg"
    img.write_bytes(image_bytes(0))
    r = _cli("search", indexed, "--image", img, "--k", "3", "--json", "--device", "cpu")
    assert r.exit_code == 0, r.output
    top = json.loads(r.stdout)["queries"][0]["results"]
    assert {top[0]["key"], top[1]["key"]} >= {"000000"} and top[0]["score"] == pytest.approx(1.0, abs=2e-3)
    assert "000023" in {t["key"] for t in top[:2]}


def test_search_table_shows_keys_paths_and_captions(indexed, embedded):
    r = _cli("search", indexed, "--text", "a red circle", "--text", "two dogs", "--k", "2", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert r.output.count(f"top 2 of {embedded[1]['counts']['rows']} image rows, flat") == 2
    res = S.run(SearchConfig(index=indexed, texts=["a red circle"], k=2, device="cpu", quiet=True))
    for hit in res["queries"][0]["results"]:
        assert hit["key"] in r.output and " | ".join(hit["captions"])[:15] in r.output


def test_search_refuses_a_model_of_other_weights_or_width_and_changed_embeddings(indexed, embedded, other_model,
                                                                                 wide_model, collection, tmp_path):
    base = ["search", indexed, "--text", "a red circle", "--device", "cpu"]
    _one_line_error(_cli(*base, "--model", other_model), "--model", "other weights", "fingerprint")
    _one_line_error(_cli(*base, "--model", wide_model), "--model", "16-d embeddings but the index holds 32-d")
    # Embeddings re-made after the index was built (another source, --overwrite): the index is stale.
    import shutil

    emb = tmp_path / "emb"
    shutil.copytree(embedded[0], emb)
    _embed(collection / "00001.tar", emb, embedded[1]["model"]["spec"], overwrite=True)
    _one_line_error(_cli("search", emb / "index", "--text", "x", "--device", "cpu"), "INDEX",
                    "changed since this index was built")


@pytest.mark.parametrize("args, needles", [
    (["embed", "{data}", "--model", "{model}", "--out", "{tmp}/o", "--modality", "pictures"], ["--modality"]),
    (["embed", "{data}", "--model", "{model}", "--out", "{tmp}/o", "--dtype", "int4"], ["--dtype"]),
    (["embed", "{data}", "--model", "{model}", "--out", "{tmp}/o", "--batch-size", "0"], ["--batch-size"]),
    (["embed", "{data}", "--model", "{model}", "--out", "{tmp}/o", "--workers", "-1"], ["--workers"]),
    (["embed", "{data}", "--model", "{model}", "--out", "{tmp}/o", "--precision", "fp8"], ["--precision"]),
    (["embed", "{data}", "--model", "{model}", "--out", "{tmp}/o", "--max-pixels", "0"], ["--max-pixels"]),
    (["embed", "{data}", "--model", "nope:x", "--out", "{tmp}/o"], ["--model", "unknown model-spec scheme"]),
    (["embed", "{tmp}/missing.tar", "--model", "{model}", "--out", "{tmp}/o"], ["SOURCE", "does not exist"]),
    (["embed", "{data}", "--model", "{model}", "--out", "{tmp}/file.txt"], ["--out", "not a directory"]),
    (["embed", "{data}", "--model", "{model}", "--out", "{tmp}/o", "--rows-per-shard", "0"], ["--rows-per-shard"]),
    (["index", "{tmp}/nowhere"], ["DIR", "not a directory"]),
    (["index", "{tmp}"], ["DIR", "not an embeddings folder"]),
    (["index", "{emb}", "--out", "{tmp}/i", "--index-type", "lsh"], ["--index-type"]),
    (["index", "{emb}", "--out", "{tmp}/i", "--over", "audio"], ["--over"]),
    (["index", "{emb}", "--out", "{tmp}/i", "--index-type", "hnsw", "--nprobe", "4"], ["--nprobe", "ivf"]),
    (["index", "{emb}", "--out", "{tmp}/i", "--recall-queries", "-1"], ["--recall-queries"]),
    (["index", "{emb}", "--out", "{tmp}/i", "--seed", "-1"], ["--seed"]),
    (["index", "{emb}", "--out", "{tmp}/file.txt"], ["--out", "not a directory"]),
    (["search", "{tmp}/nowhere", "--text", "x"], ["INDEX", "not a directory"]),
    (["search", "{tmp}", "--text", "x"], ["INDEX", "not an index"]),
    (["search", "{index}"], ["--text", "give a query"]),
    (["search", "{index}", "--text", "  "], ["--text", "non-empty"]),
    (["search", "{index}", "--text", "x", "--k", "0"], ["--k"]),
    (["search", "{index}", "--image", "{tmp}/missing.png"], ["--image", "does not exist"]),
    (["search", "{index}", "--image", "{tmp}/file.txt", "--device", "cpu"], ["--image", "not a usable image"]),
    (["search", "{index}", "--text", "x", "--model", "open_clip:NoSuchArch-1"], ["--model", "NoSuchArch-1"]),
    (["search", "{index}", "--text", "x", "--max-pixels", "0"], ["--max-pixels"]),
])
def test_bad_input_is_one_line_naming_it_and_exit_2(args, needles, collection, tiny_teacher, embedded, indexed,
                                                    tmp_path):
    (tmp_path / "file.txt").write_text("not an image")
    subs = {"{data}": str(collection), "{model}": tiny_teacher, "{tmp}": str(tmp_path), "{emb}": str(embedded[0]),
            "{index}": str(indexed)}
    argv = []
    for a in args:
        for k, v in subs.items():
            a = a.replace(k, v)
        argv.append(a)
    _one_line_error(_cli(*argv, "--quiet"), *needles)


def test_pq_on_a_collection_too_small_to_train_is_one_line(tmp_path):
    out = tmp_path / "emb"
    out.mkdir()
    x = np.random.default_rng(0).standard_normal((600, 32)).astype(np.float32)
    keys = [str(i) for i in range(600)]
    EF.write_shard(out, 0, "s", image=x, text=None, text_row=np.zeros(0, np.int64),
                   hashes=np.ones((600, 2), np.uint64), rows={"keys": keys, "paths": keys, "captions": [[]] * 600},
                   skipped=[], captionless={})
    EF.write_manifest(out, {"modality": "image", "dtype": "fp32"}, {"spec": "s", "fingerprint": "f", "embed_dim": 32},
                      _Units(1), 0.0)
    _one_line_error(_cli("index", out, "--index-type", "pq", "--quiet"), "--index-type", "too few")


def test_a_run_that_fails_before_writing_leaves_no_folder(collection, tmp_path):
    out = tmp_path / "new"
    _one_line_error(_cli("embed", collection, "--model", "open_clip:NoSuchArch-1", "--out", out, "--quiet"),
                    "--model", "NoSuchArch-1")
    assert not out.exists()
    (tmp_path / "mine").mkdir()  # a folder that was there before stays
    _one_line_error(_cli("embed", collection, "--model", "open_clip:NoSuchArch-1", "--out", tmp_path / "mine",
                         "--quiet"), "--model")
    assert (tmp_path / "mine").is_dir()

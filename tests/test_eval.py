"""eval-retrieval and eval-zeroshot: the metric math on hand-built cases, FAISS against a
brute-force torch reference, hard negatives, the report, and every bad input exiting 2."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import CAPTIONS, image_bytes, write_tar
from hierdctl.cli import app
from hierdctl.errors import UserError
from hierdctl.retrieval import (build_index, classification_metrics, hardneg_accuracy, recall_from_ranked,
                                recall_from_scores, search)
from hierdctl.stages.eval_retrieval import EvalRetrievalConfig
from hierdctl.stages.eval_retrieval import run as retrieval_run
from hierdctl.stages.eval_zeroshot import EvalZeroshotConfig
from hierdctl.stages.eval_zeroshot import run as zeroshot_run


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


# ----------------------------------------------------------------------------------
# Metric math
# ----------------------------------------------------------------------------------

# 3 images; captions 0,1 -> image 0; 2,3,4 -> image 1; 5 -> image 2.
TEXT_TO_IMAGE = np.array([0, 0, 1, 1, 1, 2])
SCORES = np.array([  # (Nt=6, Ni=3) caption-image similarities
    [0.9, 0.1, 0.2],  # t0: own image ranked 1st
    [0.3, 0.8, 0.1],  # t1: 2nd
    [0.1, 0.7, 0.2],  # t2: 1st
    [0.6, 0.2, 0.5],  # t3: 3rd
    [0.2, 0.3, 0.9],  # t4: 2nd
    [0.4, 0.5, 0.45],  # t5: 2nd
])


def test_recall_on_a_hand_built_matrix_with_several_captions_per_image():
    m = recall_from_scores(SCORES, TEXT_TO_IMAGE, [1, 2, 3])
    # image retrieval, per caption: ranks 1,2,1,3,2,2
    assert m["image_retrieval_recall@1"] == pytest.approx(2 / 6)
    assert m["image_retrieval_recall@2"] == pytest.approx(5 / 6)
    assert m["image_retrieval_recall@3"] == pytest.approx(1.0)
    # text retrieval, per image: image 0 ranks t0 first; image 1 ranks t1 (not its own) then t2;
    # image 2 ranks t4, t3, then its own t5.
    assert m["text_retrieval_recall@1"] == pytest.approx(1 / 3)
    assert m["text_retrieval_recall@2"] == pytest.approx(2 / 3)
    assert m["text_retrieval_recall@3"] == pytest.approx(1.0)


def _clip_benchmark_recall(scores: torch.Tensor, text_to_image, ks):
    """CLIP_benchmark's zeroshot_retrieval.evaluate, verbatim in spirit: positive-pair
    matrix, top-k, '> 0' for 'any positive in the top k'."""
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(scores)), torch.as_tensor(text_to_image)] = True

    def recall_at_k(s, p, k):
        topk = torch.nn.functional.one_hot(s.topk(k, dim=1)[1], s.shape[1]).sum(dim=1).bool()  # (Q,G)
        return (topk & p).sum(dim=1) / p.sum(dim=1)

    out = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = (recall_at_k(scores, positive, k) > 0).float().mean().item()
        out[f"text_retrieval_recall@{k}"] = (recall_at_k(scores.T, positive.T, k) > 0).float().mean().item()
    return out


def _random_embeddings(ni=300, per=3, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(ni, d, generator=g), dim=1)
    tti = torch.arange(ni).repeat_interleave(per)
    txt = torch.nn.functional.normalize(img[tti] + 0.2 * torch.randn(len(tti), d, generator=g), dim=1)
    return img.numpy(), txt.numpy(), tti.numpy()


def test_recall_matches_clip_benchmarks_definition():
    img, txt, tti = _random_embeddings()
    scores = torch.from_numpy(txt @ img.T)
    ours = recall_from_scores(scores, tti, [1, 5, 10])
    theirs = _clip_benchmark_recall(scores, tti, [1, 5, 10])
    assert ours == pytest.approx(theirs, abs=1e-6)
    assert 0.05 < ours["image_retrieval_recall@1"] < 0.95  # a non-degenerate case


def test_faiss_flat_equals_brute_force_torch():
    img, txt, tti = _random_embeddings(ni=500, per=2, d=48, seed=1)
    k = 10
    img_index, info = build_index(img, "flat", k)
    txt_index, _ = build_index(txt, "flat", k)
    assert info.exact and info.kind == "flat"
    got_img = search(img_index, txt, k)
    got_txt = search(txt_index, img, k)
    s = torch.from_numpy(txt @ img.T)
    np.testing.assert_array_equal(got_img, s.topk(k, dim=1).indices.numpy())
    np.testing.assert_array_equal(got_txt, s.T.topk(k, dim=1).indices.numpy())
    assert recall_from_ranked(got_img, got_txt, tti, [1, 5, 10]) == recall_from_scores(s, tti, [1, 5, 10])


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_are_labelled_and_close(kind):
    img, txt, tti = _random_embeddings(ni=2000, per=1, d=32, seed=2)
    index, info = build_index(img, kind, 10)
    assert not info.exact and "approximate" in info.label()
    approx = recall_from_ranked(search(index, txt, 10), search(build_index(txt, kind, 10)[0], img, 10), tti, [10])
    exact = recall_from_scores(txt @ img.T, tti, [10])
    # (No "approximate ≤ exact": an approximate list may hold the true image where the exact
    # top-10 does not, so that is not an invariant.)
    assert approx["image_retrieval_recall@10"] > 0.5 * exact["image_retrieval_recall@10"]


def test_gpu_indexes_share_one_resources_object(monkeypatch):
    """faiss-gpu's StandardGpuResources is made once, whatever the number of indexes (a fake
    faiss GPU API here, so this runs on CPU; the real one is exercised where faiss-gpu is)."""
    import faiss

    from hierdctl import retrieval as R

    made, used = [], []

    class FakeResources:
        def __init__(self):
            made.append(self)

    monkeypatch.setattr(faiss, "StandardGpuResources", FakeResources, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", lambda res, dev, index: used.append(res) or index, raising=False)
    R.gpu_resources.cache_clear()
    try:
        img, txt, _ = _random_embeddings(ni=50, per=1, d=8)
        for kind in ("flat", "ivf"):
            for x in (img, txt):
                _, info = build_index(x, kind, 5, use_gpu=True)
                assert info.device == "gpu"
    finally:
        R.gpu_resources.cache_clear()
    assert len(made) == 1 and len(used) == 4 and all(r is made[0] for r in used)


def test_hard_negative_accuracy_on_a_hand_built_case():
    img = np.array([[1.0, 0.0], [0.0, 1.0]])
    txt = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])  # true scores: img0 1.0, 0.6; img1 1.0
    tti = np.array([0, 0, 1])
    neg = np.array([[0.8, 0.6], [0.0, 1.0], [0.6, 0.8], [0.0, 1.0]])  # s(neg) = 0.8, 0.0, 0.8, 1.0
    neg_image = np.array([0, 0, 1, 1])
    kinds = ["a", "b", "a", "b"]
    m = hardneg_accuracy(img, txt, tti, neg, neg_image, kinds)
    # pair scores (mean over the image's true captions, ties fail): 1/2, 1, 1, 0
    assert m == pytest.approx({"hardneg_acc/a": 0.75, "hardneg_acc/b": 0.5, "hardneg_acc/all": 0.625})
    assert hardneg_accuracy(img, txt, tti, neg[:0], neg_image[:0], []) == {}


def test_classification_metrics_on_hand_built_logits():
    logits = np.array([[9, 1, 2, 3, 4, 0], [1, 9, 2, 3, 4, 0], [9, 1, 2, 3, 4, 0], [0, 1, 2, 3, 4, 9]], float)
    labels = np.array([0, 5, 2, 3])
    m = classification_metrics(logits, labels, 6)
    assert m["acc1"] == pytest.approx(1 / 4)  # only row 0
    assert m["acc5"] == pytest.approx(3 / 4)  # row 1's label is 6th; rows 2, 3 have theirs 4th, 3rd
    assert m["mean_per_class_recall"] == pytest.approx((1 + 0 + 0 + 0) / 4)  # classes 0, 5, 2, 3
    m = classification_metrics(logits, np.array([0, 0, 0, 5]), 6)
    assert m["acc1"] == pytest.approx(3 / 4) and m["mean_per_class_recall"] == pytest.approx((2 / 3 + 1) / 2)
    assert "acc5" not in classification_metrics(logits[:, :3], labels % 3, 3)


def test_classification_metrics_equal_a_full_stable_sort_with_ties():
    """Top-k from the true class's rank gives what sorting every row did, ties included
    (integer logits in a small range: many ties; a tie goes to the lower class index)."""
    rng = np.random.default_rng(0)
    for n, c in ((200, 7), (300, 3), (5000, 12)):
        logits = rng.integers(0, 4, (n, c)).astype(np.float32)
        labels = rng.integers(0, c, n)
        order = np.argsort(-logits, axis=1, kind="stable")  # the old, O(N·C·log C) way
        correct = order == labels[:, None]
        want = {"acc1": correct[:, 0].mean()}
        if c >= 5:
            want["acc5"] = correct[:, :5].any(axis=1).mean()
        want["mean_per_class_recall"] = np.mean([correct[labels == k, 0].mean() for k in np.unique(labels)])
        assert classification_metrics(logits, labels, c) == pytest.approx(want, abs=1e-12)
    tie = np.array([[1.0, 1.0, 0.0]])  # a tie: the lower index wins top-1
    assert classification_metrics(tie, np.array([0]), 3)["acc1"] == 1.0
    assert classification_metrics(tie, np.array([1]), 3)["acc1"] == 0.0


# ----------------------------------------------------------------------------------
# The stage, end to end on a tiny teacher
# ----------------------------------------------------------------------------------

NEG_KINDS = ("swap_attribute", "swap_relation")


@pytest.fixture(scope="module")
def retrieval_data(tmp_path_factory) -> str:
    """12 samples, 2–3 captions each, hard negatives on the first 8, one corrupt image."""
    d = tmp_path_factory.mktemp("eval")
    samples = []
    for i in range(12):
        caps = [CAPTIONS[(i + j) % len(CAPTIONS)] + f" number {i}" for j in range(2 + i % 2)]
        meta = {"captions": caps}
        if i < 8:
            meta["hard_negatives"] = {k: [f"{k} negative {i} {j}" for j in range(2)] for k in NEG_KINDS}
        samples.append({"key": f"{i:06d}", "jpg": image_bytes(i), "txt": caps[0], "json": meta})
    samples.append({"key": "bad", "jpg": b"not a jpeg", "txt": "broken", "json": {}})
    write_tar(d / "00000.tar", samples)
    return str(d / "00000.tar")


@pytest.fixture(scope="module")
def other_model(tmp_path_factory) -> str:
    from conftest import TINY_CFG, make_tiny_model, save_local_dir

    return "local-dir:" + str(save_local_dir(make_tiny_model(seed=1), TINY_CFG, tmp_path_factory.mktemp("m") / "s1"))


def test_retrieval_report_end_to_end(retrieval_data, tiny_teacher, other_model, tmp_path):
    out = tmp_path / "report.json"
    cfg = EvalRetrievalConfig(source=retrieval_data, models=[tiny_teacher, other_model, tiny_teacher], ks=[1, 5],
                              batch_size=5, device="cpu", out=out, save_index=tmp_path / "idx", quiet=True)
    report = retrieval_run(cfg)
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))  # the file is the returned report
    c = report["counts"]
    assert (c["images"], c["captions"]) == (12, 30)
    assert c["skipped"] == {"corrupt_image": 1} and c["skipped_total"] == 1
    assert c["hard_negatives"] == {k: 16 for k in NEG_KINDS} and c["images_with_hard_negatives"] == 8
    assert report["index"]["kind"] == "flat" and report["exact"] is True
    names = {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5)}
    names |= {f"hardneg_acc/{k}" for k in NEG_KINDS} | {"hardneg_acc/all"}
    ref, other, again = report["models"]
    assert set(ref["metrics"]) == names
    assert ref["spec"] == tiny_teacher and ref["retention"] == {}
    assert again["metrics"] == ref["metrics"]  # the same model twice: identical numbers...
    assert all(v == 100.0 for v in again["retention"].values())  # ...and 100 % retention
    assert again["retention"] == {k: 100.0 for k, v in ref["metrics"].items() if v > 0} and again["retention"]
    for k, v in other["metrics"].items():
        assert 0.0 <= v <= 1.0
        if ref["metrics"][k] > 0:
            assert other["retention"][k] == pytest.approx(100 * v / ref["metrics"][k], abs=0.01)
    assert ref["timing"]["images_per_s"] > 0 and report["versions"]["faiss"]
    # The saved embeddings reproduce the report through the brute-force reference.
    d = tmp_path / "idx" / "model-0"
    img, txt = np.load(d / "image_emb.npy"), np.load(d / "text_emb.npy")
    tti = np.load(d / "text_to_image.npy")
    assert img.shape == (12, 32) and txt.shape == (30, 32)
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1, atol=1e-5)
    brute = recall_from_scores(txt @ img.T, tti, [1, 5])
    assert {k: ref["metrics"][k] for k in brute} == brute
    import faiss

    assert faiss.read_index(str(d / "image.faiss")).ntotal == 12
    assert json.loads((tmp_path / "idx" / "index.json").read_text())["models"][1]["spec"] == other_model


def test_save_index_never_replaces_a_folder_hierdctl_did_not_write(retrieval_data, tiny_teacher, tmp_path):
    # A folder with an index.json of some other tool: refused even with --overwrite, and kept.
    foreign = tmp_path / "theirs"
    foreign.mkdir()
    (foreign / "index.json").write_text(json.dumps({"schema": "someone-else/2", "note": "mine"}))
    (foreign / "vectors.bin").write_bytes(b"\x00" * 16)
    before = {p.name: p.read_bytes() for p in foreign.iterdir()}
    r = _cli("eval-retrieval", retrieval_data, "--model", tiny_teacher, "--k", "1", "--quiet", "--device", "cpu",
             "--save-index", foreign, "--overwrite")
    assert r.exit_code == 2 and "--save-index" in r.output and "not written by hierdctl" in r.output, r.output
    assert {p.name: p.read_bytes() for p in foreign.iterdir()} == before
    (foreign / "index.json").write_text("not json")  # unreadable: not hierdctl's either
    with pytest.raises(UserError, match="--save-index"):
        EvalRetrievalConfig(source=retrieval_data, models=[tiny_teacher], save_index=foreign, overwrite=True).validate()
    assert (foreign / "vectors.bin").exists()
    # hierdctl's own index: kept without --overwrite (an error naming --save-index), replaced with it.
    cfg = dict(source=retrieval_data, models=[tiny_teacher], ks=[1], device="cpu", quiet=True, workers=0)
    idx = tmp_path / "idx"
    retrieval_run(EvalRetrievalConfig(**cfg, save_index=idx))
    first = (idx / "index.json").read_text()
    with pytest.raises(UserError, match="--overwrite") as e:
        retrieval_run(EvalRetrievalConfig(**cfg, save_index=idx))
    assert e.value.where == "--save-index" and (idx / "index.json").read_text() == first
    other = write_tar(tmp_path / "small.tar", [{"key": f"{i}", "jpg": image_bytes(i), "txt": CAPTIONS[i]} for i in range(3)])
    retrieval_run(EvalRetrievalConfig(**(cfg | {"source": str(other)}), save_index=idx, overwrite=True))
    assert np.load(idx / "model-0" / "image_emb.npy").shape[0] == 3  # the new index, and nothing else beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx", "small.tar", "theirs"]


def test_embeddings_are_kept_only_for_save_index(retrieval_data, tiny_teacher, other_model, tmp_path, monkeypatch):
    """Without --save-index a model's embeddings are freed before the next model encodes."""
    import gc
    import weakref

    from hierdctl.stages import eval_retrieval as ER

    real, alive_at_call = ER.embed_source, []
    refs: list = []

    def tracking(*a, **k):
        gc.collect()
        alive_at_call.append(sum(r() is not None for r in refs))
        e = real(*a, **k)
        refs.append(weakref.ref(e))
        return e

    monkeypatch.setattr(ER, "embed_source", tracking)
    cfg = dict(source=retrieval_data, models=[tiny_teacher, other_model, tiny_teacher], ks=[1], device="cpu",
               quiet=True, workers=0)
    retrieval_run(EvalRetrievalConfig(**cfg))
    assert alive_at_call == [0, 0, 0]
    alive_at_call.clear(), refs.clear()
    retrieval_run(EvalRetrievalConfig(**cfg, save_index=tmp_path / "idx"))
    assert alive_at_call == [0, 1, 2]


def test_retrieval_with_an_approximate_index_says_so(retrieval_data, tiny_teacher):
    report = retrieval_run(EvalRetrievalConfig(source=retrieval_data, models=[tiny_teacher], ks=[1], index="hnsw",
                                               device="cpu", quiet=True))
    assert report["exact"] is False and report["index"]["kind"] == "hnsw"
    r = _cli("eval-retrieval", retrieval_data, "--model", tiny_teacher, "--k", "1,5", "--index", "ivf", "--quiet",
             "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "APPROXIMATE" in r.output and "image_retrieval_recall@5" in r.output


def test_cli_table_has_a_column_per_model_and_retention(retrieval_data, tiny_teacher, other_model, tmp_path):
    r = _cli("eval-retrieval", retrieval_data, "--model", tiny_teacher, "--model", other_model, "--k", "1,5",
             "--quiet", "--device", "cpu", "--out", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    assert "ref:" in r.output and "%)" in r.output and "hardneg_acc/all" in r.output
    assert len(json.loads((tmp_path / "r.json").read_text())["models"]) == 2


def test_retrieval_bad_input_exits_2(retrieval_data, tiny_teacher, tmp_path, monkeypatch):
    base = ["eval-retrieval", retrieval_data, "--quiet", "--device", "cpu"]
    r = _cli(*base, "--model", "nope:thing")
    assert r.exit_code == 2 and "unknown model-spec scheme" in r.output
    r = _cli(*base, "--model", "open_clip:NoSuchArch-1")
    assert r.exit_code == 2 and "NoSuchArch-1" in r.output
    r = _cli(*base, "--model", tiny_teacher, "--k", "1,50")
    assert r.exit_code == 2 and "K=50 is larger than the gallery (12 images" in r.output
    r = _cli(*base, "--model", tiny_teacher, "--k", "one")
    assert r.exit_code == 2 and "--k" in r.output
    r = _cli(*base, "--model", tiny_teacher, "--index", "lsh")
    assert r.exit_code == 2 and "--index" in r.output
    r = _cli("eval-retrieval", tmp_path / "missing.tar", "--model", tiny_teacher)
    assert r.exit_code == 2 and "does not exist" in r.output
    empty = write_tar(tmp_path / "empty.tar", [{"key": "a", "jpg": b"junk", "txt": "x"}, {"key": "b", "jpg": b"", "txt": "y"}])
    r = _cli("eval-retrieval", empty, "--model", tiny_teacher, "--quiet", "--device", "cpu")
    assert r.exit_code == 2 and "no usable image" in r.output and "corrupt_image" in r.output
    # A model whose image and text embeddings differ in width.
    from hierdctl import specs

    real = specs.OpenClipEncoder.encode_image
    monkeypatch.setattr(specs.OpenClipEncoder, "encode_image", lambda self, x, want_patches=False: (real(self, x)[0][:, :16], None))
    r = _cli(*base, "--model", tiny_teacher)
    assert r.exit_code == 2 and "16-wide image embeddings but 32-wide text" in r.output
    assert r.output.count("\n") <= 2  # one message, no traceback


def test_retrieval_reads_csv_with_several_captions(tmp_path, tiny_teacher):
    rows = []
    for i in range(6):
        (tmp_path / f"{i}.jpg").write_bytes(image_bytes(i))
        rows.append(json.dumps({"image": f"{i}.jpg", "caption": [CAPTIONS[i], CAPTIONS[(i + 1) % 6] + " too"]}))
    (tmp_path / "pairs.jsonl").write_text("\n".join(rows) + "\n")
    report = retrieval_run(EvalRetrievalConfig(source=str(tmp_path / "pairs.jsonl"), models=[tiny_teacher], ks=[1, 6],
                                               device="cpu", quiet=True, workers=0))
    assert report["counts"]["captions"] == 12 and report["counts"]["captions_per_image"]["max"] == 2
    assert report["models"][0]["metrics"]["image_retrieval_recall@6"] == 1.0  # K = the whole gallery


def test_config_validation(tmp_path):
    with pytest.raises(UserError, match="--model"):
        EvalRetrievalConfig(source="x", models=[]).validate()
    with pytest.raises(UserError, match="--k"):
        EvalRetrievalConfig(source="x", models=["open_clip:RN50"], ks=[0]).validate()
    m = ["open_clip:RN50"]
    for kw, where in (({"nprobe": 4}, "--nprobe"), ({"nprobe": 4, "index": "hnsw"}, "--nprobe"),
                      ({"max_pixels": 0}, "--max-pixels"), ({"out": tmp_path}, "--out"),
                      ({"out": tmp_path / "no" / "such" / "r.json"}, "--out")):
        with pytest.raises(UserError) as e:
            EvalRetrievalConfig(source="x", models=m, **kw).validate()
        assert e.value.where == where, kw
    EvalRetrievalConfig(source="x", models=m, index="ivf", nprobe=4, out=tmp_path / "r.json").validate()
    for kw, where in (({"max_pixels": -1}, "--max-pixels"), ({"out": tmp_path}, "--out"),
                      ({"out": tmp_path / "no" / "r.json"}, "--out")):
        with pytest.raises(UserError) as e:
            EvalZeroshotConfig(source="x", models=m, **kw).validate()
        assert e.value.where == where, kw


def test_eval_output_errors_exit_2_before_any_model_loads(retrieval_data, tiny_teacher, tmp_path):
    base = ["eval-retrieval", retrieval_data, "--model", tiny_teacher, "--quiet", "--device", "cpu"]
    for extra, needle in ((["--out", tmp_path], "is a directory"),
                          (["--out", tmp_path / "missing" / "r.json"], "does not exist"),
                          (["--max-pixels", "0"], "--max-pixels"),
                          (["--nprobe", "3"], "--index ivf")):
        r = _cli(*base, *extra)
        assert r.exit_code == 2 and needle in r.output, (extra, r.output)
        assert r.output.count("\n") <= 2
    assert not (tmp_path / "missing").exists()


# ----------------------------------------------------------------------------------
# Zero-shot
# ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def class_tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("zs") / "tree"
    for c, name in enumerate(["red_circle", "blue_square", "green_triangle"]):
        (root / name).mkdir(parents=True)
        for j in range(3):
            (root / name / f"{j}.png").write_bytes(image_bytes(10 * c + j, fmt="PNG"))
    (root / "blue_square" / "broken.jpg").write_bytes(b"nope")
    return root


def _direct_predictions(spec: str, files: list[Path], names: list[str], templates) -> np.ndarray:
    """(N,) argmax class of each image, computed here: the encoder's own transform and
    embedding, the classifier's weights, the logits."""
    from PIL import Image

    from hierdctl.specs import load_encoder
    from hierdctl.stages.eval_zeroshot import classifier

    enc = load_encoder(spec)
    w = classifier(enc, names, templates, batch_size=7)  # (C,D)
    x = torch.stack([enc.eval_transform(Image.open(f).convert("RGB")) for f in files])
    with torch.no_grad():
        img = enc.encode_image(x)[0].numpy()  # (N,D)
    return (img @ w.T).argmax(axis=1)


def test_zeroshot_on_a_folder_tree(class_tree, tiny_teacher, other_model, tmp_path):
    from hierdctl.stages.eval_zeroshot import load_templates

    tpl = tmp_path / "templates.txt"
    tpl.write_text("a photo of a {c}.\na drawing of a {c}.\n")
    report = zeroshot_run(EvalZeroshotConfig(source=str(class_tree), models=[tiny_teacher, other_model, tiny_teacher],
                                             classnames="folders", templates=str(tpl), device="cpu",
                                             out=tmp_path / "zs.json", quiet=True))
    c = report["counts"]
    assert (c["images"], c["classes"], c["templates"]) == (9, 3, 2)
    assert c["skipped"] == {"corrupt_image": 1}
    m = report["models"][0]["metrics"]
    assert set(m) == {"acc1", "mean_per_class_recall"} and "acc5" in report["notes"][0]
    assert 0 <= m["acc1"] <= 1 and report["models"][1]["retention"] is not None
    # The numbers, computed directly: classes in sorted folder order, 3 images each.
    names = ["blue square", "green triangle", "red circle"]
    files = [class_tree / n.replace(" ", "_") / f"{j}.png" for n in names for j in range(3)]
    labels = np.repeat(np.arange(3), 3)
    templates, _ = load_templates(str(tpl))
    accs = []
    for spec, got in zip([tiny_teacher, other_model], report["models"]):
        acc1 = float((_direct_predictions(spec, files, names, templates) == labels).mean())
        assert got["metrics"]["acc1"] == pytest.approx(acc1, abs=1e-9), spec
        accs.append(acc1)
    ref, other, again = report["models"]
    assert again["metrics"] == ref["metrics"]  # the reference against itself: 100 % wherever it scores
    assert again["retention"] == {k: 100.0 for k, v in ref["metrics"].items() if v > 0}
    assert accs[0] > 0 and other["retention"]["acc1"] == pytest.approx(round(100 * accs[1] / accs[0], 2))
    # Balanced classes: mean per-class recall equals top-1 accuracy.
    assert m["mean_per_class_recall"] == pytest.approx(m["acc1"])
    assert json.loads((tmp_path / "zs.json").read_text())["task"] == "zeroshot"


def test_zeroshot_classifier_matches_a_direct_computation(class_tree, tiny_teacher):
    from hierdctl.specs import load_encoder
    from hierdctl.stages.eval_zeroshot import classifier, load_templates

    enc = load_encoder(tiny_teacher)
    templates, _ = load_templates("simple")
    w = classifier(enc, ["cat", "dog"], templates, batch_size=3)
    with torch.no_grad():
        e = enc.encode_text(enc.tokenize([t("dog") for t in templates]))[0].mean(0)
    np.testing.assert_allclose(w[1], (e / e.norm()).numpy(), atol=1e-6)


def test_zeroshot_on_shards_with_class_field(tmp_path, tiny_teacher):
    names = ["cat", "dog", "car", "tree", "house", "boat"]
    samples = [{"key": f"{i:04d}", "jpg": image_bytes(i), "cls": str(i % 6)} for i in range(12)]
    samples.append({"key": "named", "jpg": image_bytes(50), "json": {"cls": "boat"}})
    samples.append({"key": "unknown", "jpg": image_bytes(51), "json": {"cls": "zebra"}})
    samples.append({"key": "range", "jpg": image_bytes(52), "cls": "9"})
    write_tar(tmp_path / "00000.tar", samples)
    (tmp_path / "names.json").write_text(json.dumps(names))
    report = zeroshot_run(EvalZeroshotConfig(source=str(tmp_path / "00000.tar"), models=[tiny_teacher],
                                             classnames=str(tmp_path / "names.json"), templates="simple",
                                             device="cpu", quiet=True))
    assert report["counts"]["images"] == 13
    assert report["counts"]["skipped"] == {"bad_label": 1, "label_out_of_range": 1}
    assert set(report["models"][0]["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    # The labels the shards give: the .cls index, or the class name's position ("boat" -> 5).
    from hierdctl.sources import Sample, Skip
    from hierdctl.sources import LabelledShards
    from hierdctl.stages.eval_zeroshot import load_templates

    src = LabelledShards(str(tmp_path / "00000.tar"), [str(tmp_path / "00000.tar")], "cls", names)
    items = list(src.iter_unit(src.units[0]))
    got = {s.key: s.meta["label"] for s in items if isinstance(s, Sample)}
    assert got == {f"{i:04d}": i % 6 for i in range(12)} | {"named": 5}
    assert {s.key: s.reason for s in items if isinstance(s, Skip)} == {"unknown": "bad_label", "range": "label_out_of_range"}
    # acc1 and acc5, computed directly from the classifier and the encoder.
    from PIL import Image

    from hierdctl.specs import load_encoder
    from hierdctl.stages.eval_zeroshot import classifier

    enc = load_encoder(tiny_teacher)
    w = classifier(enc, names, load_templates("simple")[0], batch_size=4)
    keys = [s.key for s in items if isinstance(s, Sample)]
    x = torch.stack([enc.eval_transform(Image.open(io.BytesIO(s.image)).convert("RGB")) for s in items if isinstance(s, Sample)])
    with torch.no_grad():
        logits = enc.encode_image(x)[0].numpy() @ w.T  # (13,6)
    y = np.array([got[k] for k in keys])
    m = report["models"][0]["metrics"]
    assert m["acc1"] == pytest.approx(float((logits.argmax(1) == y).mean()), abs=1e-9)
    top5 = np.argsort(-logits, axis=1)[:, :5]
    assert m["acc5"] == pytest.approx(float((top5 == y[:, None]).any(1).mean()), abs=1e-9)


def test_labels_true_and_non_decimal_digits_are_bad_labels(tmp_path):
    """JSON true is not class 1 (bool is an int in Python); "²" passes str.isdigit but is no
    number: both are counted bad_label skips, never a crash."""
    from hierdctl.sources import Sample, Skip
    from hierdctl.sources import LabelledShards

    samples = [{"key": "t", "jpg": image_bytes(0), "json": {"cls": True}},
               {"key": "sq", "jpg": image_bytes(1), "cls": "²"},
               {"key": "sq2", "jpg": image_bytes(2), "json": {"cls": "²"}},
               {"key": "f", "jpg": image_bytes(3), "json": {"cls": 1.0}},
               {"key": "ok", "jpg": image_bytes(4), "json": {"cls": 1}},
               {"key": "ok2", "jpg": image_bytes(5), "cls": " 2 "},
               {"key": "neg", "jpg": image_bytes(6), "cls": "-1"}]
    p = write_tar(tmp_path / "00000.tar", samples)
    src = LabelledShards(str(p), [str(p)], "cls", ["a", "b", "c"])
    items = {s.key: s for s in src.iter_unit(src.units[0])}
    assert {k: s.reason for k, s in items.items() if isinstance(s, Skip)} == {
        "t": "bad_label", "sq": "bad_label", "sq2": "bad_label", "f": "bad_label", "neg": "label_out_of_range"}
    assert {k: s.meta["label"] for k, s in items.items() if isinstance(s, Sample)} == {"ok": 1, "ok2": 2}


def test_zeroshot_bad_input_exits_2(class_tree, tiny_teacher, tmp_path):
    base = ["eval-zeroshot", class_tree, "--model", tiny_teacher, "--quiet", "--device", "cpu"]
    r = _cli(*base)  # 3 folders, 1000 ImageNet names
    assert r.exit_code == 2 and "3 class folders" in r.output and "1000" in r.output
    bad = tmp_path / "t.txt"
    bad.write_text("a photo\n")
    r = _cli(*base, "--classnames", "folders", "--templates", bad)
    assert r.exit_code == 2 and "placeholder" in r.output
    r = _cli("eval-zeroshot", class_tree, "--model", "bogus", "--classnames", "folders")
    assert r.exit_code == 2 and "no scheme" in r.output
    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    r = _cli("eval-zeroshot", empty, "--model", tiny_teacher, "--classnames", "folders")
    assert r.exit_code == 2 and "no images" in r.output
    r = _cli("eval-zeroshot", tmp_path / "nowhere", "--model", tiny_teacher, "--classnames", "folders")
    assert r.exit_code == 2 and "SOURCE:" in r.output and "does not exist" in r.output, r.output
    r = _cli(*base, "--classnames", "folders", "--max-pixels", "0")
    assert r.exit_code == 2 and "--max-pixels" in r.output
    r = _cli(*base, "--classnames", "folders", "--out", tmp_path)
    assert r.exit_code == 2 and "--out" in r.output and "is a directory" in r.output
    r = _cli(*base, "--classnames", "folders")
    assert r.exit_code == 0, r.output
    assert "acc1" in r.output


def test_ties_rank_the_lower_index_first_as_clip_benchmark_does():
    """Duplicate captions give exactly equal scores: the lower id must come first, for FAISS's
    exact index as for the brute-force reference (CLIP_benchmark's recall@1 is torch.topk, k = 1)."""
    from hierdctl import retrieval as R

    rng = np.random.default_rng(0)
    g = rng.standard_normal((300, 16)).astype(np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    g[[7, 40, 123, 250]] = g[250]  # four identical gallery rows
    g[[3, 299]] = g[3]
    q = np.concatenate([g[[250, 3]], rng.standard_normal((20, 16)).astype(np.float32)])
    index, _ = R.build_index(g, "flat", 5)
    got = R.search(index, q, 5, gallery=g)
    assert got[0, :4].tolist() == [7, 40, 123, 250] and got[1, :2].tolist() == [3, 299]
    scores = q @ g.T
    rounded = np.round(scores, 5)  # identical vectors' scores may differ in the last bit: one tie
    want = np.lexsort((np.broadcast_to(np.arange(300), scores.shape), -rounded), axis=1)[:, :5]
    assert (got == want).all()
    # A tie group longer than what FAISS returns is ranked exactly by brute force.
    h = np.repeat(g[:1], 40, axis=0)
    idx, _ = R.build_index(h, "flat", 1)
    assert R.search(idx, h[:1], 3, gallery=h)[0].tolist() == [0, 1, 2]
    # The brute-force reference ranks the same way.
    ref = R.recall_from_scores(scores, np.arange(22) % 300, [1, 5])
    idx2, _ = R.build_index(g, "flat", 5)
    ranked = R.search(idx2, q, 5, gallery=g)
    assert ranked[0, 0] == 7 and ref == R.recall_from_ranked(ranked, R.search(R.build_index(q, "flat", 5)[0], g, 5,
                                                                                  gallery=q), np.arange(22) % 300, [1, 5])

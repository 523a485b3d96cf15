"""The CUDA paths on a real GPU, through the CLI: cache-teacher in bf16 against the CPU's
fp32, distill in bf16 and in fp16 with the GradScaler (the loss falls, a killed run
resumes to the uninterrupted run's curve), eval-retrieval on the GPU against the CPU's
exact search.

Every test is marked `gpu` and skipped without a CUDA device; bench/gpu/run_gpu.py runs
them on the GPU machine (`pytest -m gpu tests/test_gpu.py`). The helpers take the device
as an argument, so their logic can be rehearsed on the CPU (see bench/gpu/README.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import make_shards
from hierdctl.cli import app

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# bf16 keeps 8 mantissa bits (relative step 2^-8 ≈ 0.4 %); through the tiny teacher's two
# layers an L2-normalised embedding (D = 32, entries ~0.18) moves by at most ~0.01 on the
# CPU's bf16 autocast. 0.03 leaves room for the GPU's other kernels.
BF16_ATOL = 3e-2


def _cli(*args: str) -> str:
    r = CliRunner().invoke(app, list(args))
    assert r.exit_code == 0, (r.output, r.exception)
    return r.output


def _cache_arrays(cache: Path) -> dict[str, object]:
    """key -> CachedSample of every sample of a finished cache."""
    from hierdctl import cache_format

    c = cache_format.open_cache(cache)
    return {s.key: s for p in c.shards for s in cache_format.iter_shard(p)}


# ----------------------------------------------------------------------------------
# cache-teacher
# ----------------------------------------------------------------------------------


def run_cache_pair(tmp: Path, teacher: str, device: str, precision: str) -> tuple[dict, dict]:
    """The same source cached on the CPU in fp32 and on `device` in `precision`
    (arrays stored as fp32, so only the compute differs). Returns both caches' samples."""
    src = make_shards(tmp / "data", n_shards=2, per_shard=12)
    common = ["--teacher", teacher, "--views", "2", "--clusters", "4", "--max-phrases", "3", "--dtype", "fp32",
              "--batch-size", "8", "--quiet"]
    _cli("cache-teacher", src, "--out", str(tmp / "ref"), "--device", "cpu", "--precision", "fp32", "--workers", "0",
         *common)
    _cli("cache-teacher", src, "--out", str(tmp / "dev"), "--device", device, "--precision", precision,
         "--workers", "2", *common)
    return _cache_arrays(tmp / "ref"), _cache_arrays(tmp / "dev")


def check_cache_pair(ref: dict, dev: dict, atol: float) -> dict:
    """Same samples, views, captions and phrases; embeddings within `atol`; each device image
    embedding nearest to its own reference embedding. Returns the largest differences."""
    assert sorted(ref) == sorted(dev) and len(ref) == 24
    worst = {}
    for key in ref:
        a, b = ref[key], dev[key]
        assert a.meta == b.meta, key  # views, captions, phrases: decided on the CPU, identical
        assert a.image == b.image
        for name in ("img_emb", "txt_emb", "phr_emb", "clu_emb"):
            x, y = a.arrays[name], b.arrays[name]
            assert x.shape == y.shape, (name, x.shape, y.shape)
            if name == "clu_emb":  # a flipped k-means assignment moves a cluster's mean: compared below
                continue
            worst[name] = max(worst.get(name, 0.0), float(np.abs(x - y).max()))
        np.testing.assert_array_equal(a.arrays["phr_mask"], b.arrays["phr_mask"])
    for name in ("img_emb", "txt_emb", "phr_emb"):
        assert worst[name] <= atol, (name, worst[name], atol)
    # The images are distinguishable: the device embedding of view v of sample i is nearest
    # to the reference embedding of that same view and sample (no order or view mix-up).
    keys = sorted(ref)
    r = np.concatenate([ref[k].arrays["img_emb"] for k in keys])  # (N·V, D)
    d = np.concatenate([dev[k].arrays["img_emb"] for k in keys])
    assert (np.argmax(d @ r.T, axis=1) == np.arange(len(r))).mean() >= 0.95
    # k-means runs on the teacher's patch tokens: in bf16 a few near-tie patches may change
    # cluster; most keep theirs.
    same = np.mean([(ref[k].arrays["clu_assign"] == dev[k].arrays["clu_assign"]).mean() for k in keys])
    worst["clu_assign_agreement"] = float(same)
    assert same >= 0.8, same
    return worst


def test_cache_teacher_bf16_on_cuda_matches_cpu(tmp_path, tiny_teacher):
    ref, dev = run_cache_pair(tmp_path, tiny_teacher, "cuda", "bf16")
    check_cache_pair(ref, dev, BF16_ATOL)
    manifest = json.loads((tmp_path / "dev" / "manifest.json").read_text())
    assert manifest["teacher"]["precision"] == "bf16" and manifest["complete"]


def test_cache_teacher_fp32_on_cuda_matches_cpu_closely(tmp_path, tiny_teacher):
    # fp32 on the GPU differs from the CPU only by summation order (and TF32 convolutions).
    ref, dev = run_cache_pair(tmp_path, tiny_teacher, "cuda", "fp32")
    worst = check_cache_pair(ref, dev, 5e-3)
    assert worst["clu_assign_agreement"] >= 0.95


# ----------------------------------------------------------------------------------
# distill
# ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_teacher) -> Path:
    d = tmp_path_factory.mktemp("gpu-distill")
    src = make_shards(d / "data", n_shards=2, per_shard=8)
    _cli("cache-teacher", src, "--out", str(d / "cache"), "--teacher", tiny_teacher, "--clusters", "4",
         "--max-phrases", "3", "--device", "cpu", "--workers", "0", "--quiet")
    return d / "cache"


class Killed(Exception):
    """Raised right after a checkpoint, as if the process died there."""


def distill_args(cache: Path, out: Path, device: str, precision: str, *extra: str) -> list[str]:
    # One global batch = the whole 16-sample cache: every step sees the same pairs, so the
    # loss must fall. hierd+rd uses every cache part and every student extra but MFD's.
    return ["distill", str(cache), "--out", str(out), "--student", "tiny-test", "--recipe", "hierd+rd",
            "--steps", "12", "--batch-size", "16", "--lr", "2e-3", "--warmup", "1", "--save-every", "6",
            "--log-every", "1", "--seed", "1", "--workers", "0", "--device", device, "--precision", precision,
            "--quiet", *extra]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def run_distill_and_resume(cache: Path, tmp: Path, device: str, precision: str, monkeypatch) -> dict:
    """An uninterrupted run, and a run killed after its step-6 checkpoint then resumed.
    Returns what the test compares."""
    from safetensors.torch import load_file

    from hierdctl.stages import distill as S

    full, part = tmp / "full", tmp / "part"
    _cli(*distill_args(cache, full, device, precision))

    real_save = S.save_checkpoint

    def save_then_die(out, step, *a, **k):
        path = real_save(out, step, *a, **k)
        if step == 6:
            raise Killed
        return path

    monkeypatch.setattr(S, "save_checkpoint", save_then_die)
    r = CliRunner().invoke(app, distill_args(cache, part, device, precision))
    assert isinstance(r.exception, Killed), (r.output, r.exception)
    monkeypatch.setattr(S, "save_checkpoint", real_save)
    assert json.loads((part / "checkpoints" / "latest.json").read_text())["step"] == 6
    out = _cli(*distill_args(cache, part, device, precision, "--resume"))
    assert "resumed from" in out, out

    ck = lambda run, step: load_file(str(run / "checkpoints" / f"step-{step:07d}.safetensors"))  # noqa: E731
    w6, w12, w12_resumed = ck(full, 6), ck(full, 12), ck(part, 12)
    state = torch.load(part / "checkpoints" / "step-0000012.state.pt", weights_only=True)
    return {"full": _metrics(full), "part": _metrics(part), "scaler": state["scaler"],
            "weights_max_diff": max(float((w12[k].float() - w12_resumed[k].float()).abs().max()) for k in w12),
            "weights_moved": max(float((w12[k].float() - w6[k].float()).abs().max()) for k in w12)}


def check_distill(res: dict, precision: str, rtol: float) -> None:
    full, part = res["full"], res["part"]
    assert [r["step"] for r in full] == list(range(1, 13)) == [r["step"] for r in part]
    losses = [r["loss"] for r in full]
    assert all(np.isfinite(losses)), losses
    assert losses[-1] < 0.9 * losses[0], losses  # it learns (in fp16 too, skipped steps and all)
    # The resumed half follows the uninterrupted one: weights, optimizer, scaler, RNG and data
    # position all came back from the step-6 checkpoint.
    np.testing.assert_allclose([r["loss"] for r in part[6:]], losses[6:], rtol=rtol)
    assert res["weights_max_diff"] <= 0.1 * res["weights_moved"], res  # a lost optimizer state: ~1×
    if precision == "fp16":
        assert res["scaler"].get("scale", 0) > 0, res["scaler"]  # the GradScaler's state is saved
    else:
        assert res["scaler"] == {}, res["scaler"]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_distill_on_cuda_learns_and_resumes(cache, tmp_path, monkeypatch, precision):
    res = run_distill_and_resume(cache, tmp_path, "cuda", precision, monkeypatch)
    # CUDA kernels are not bit-reproducible run to run (atomics in some backward passes).
    check_distill(res, precision, rtol=1e-2)


# ----------------------------------------------------------------------------------
# eval-retrieval
# ----------------------------------------------------------------------------------


def run_eval_pair(tmp: Path, teacher: str, device: str) -> dict:
    """eval-retrieval on Scenes test images on the CPU and on `device`, indexes saved."""
    _cli("scenes", "--out", str(tmp / "scenes"), "--n-train", "0", "--n-test", "48", "--image-size", "32",
         "--shard-size", "24")
    out = {}
    for name, dev in (("ref", "cpu"), ("dev", device)):
        _cli("eval-retrieval", str(tmp / "scenes" / "test"), "--model", teacher, "--device", dev, "--k", "1,5,10",
             "--out", str(tmp / f"{name}.json"), "--save-index", str(tmp / f"{name}-index"), "--workers", "2",
             "--quiet")
        out[name] = json.loads((tmp / f"{name}.json").read_text())
        out[name + "_dir"] = tmp / f"{name}-index" / "model-0"
    return out


@pytest.fixture(scope="module")
def eval_pair(tmp_path_factory, tiny_teacher) -> dict:
    return run_eval_pair(tmp_path_factory.mktemp("gpu-eval"), tiny_teacher, "cuda")


def exact_topk(gallery: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """(Q,k) the exact top-k scores, best first, in float64 on the CPU."""
    s = queries.astype(np.float64) @ gallery.astype(np.float64).T
    return -np.sort(-s, axis=1)[:, :k]


def check_search_is_exact(gallery: np.ndarray, queries: np.ndarray, ids: np.ndarray, tol: float = 1e-5) -> None:
    """ids (Q,k) from some index: their scores must be the exact top-k scores. Ties (equal
    captions of different images) may come in any order, so scores, not ids, are compared."""
    k = ids.shape[1]
    got = np.einsum("qd,qkd->qk", queries.astype(np.float64), gallery.astype(np.float64)[ids])
    np.testing.assert_allclose(got, exact_topk(gallery, queries, k), rtol=0, atol=tol)


def test_eval_retrieval_on_cuda_equals_cpu(eval_pair):
    ref, dev = eval_pair["ref"], eval_pair["dev"]
    assert ref["counts"] == dev["counts"] and ref["counts"]["images"] == 48
    # Embeddings: fp32 on both (TF32 only in the patch convolution on the GPU).
    for name in ("image_emb.npy", "text_emb.npy"):
        a, b = np.load(eval_pair["ref_dir"] / name), np.load(eval_pair["dev_dir"] / name)
        assert np.abs(a - b).max() < 5e-3, name
    # Every metric equal, but for at most one query whose nearest two candidates swapped
    # under the GPU's rounding (1/48 of an image metric, 1/N_captions of a text one).
    n_img, n_txt = ref["counts"]["images"], ref["counts"]["captions"]
    m_ref, m_dev = ref["models"][0]["metrics"], dev["models"][0]["metrics"]
    assert m_ref.keys() == m_dev.keys()
    for k in m_ref:
        assert abs(m_ref[k] - m_dev[k]) <= 1.0 / min(n_img, n_txt) + 1e-9, (k, m_ref[k], m_dev[k])
    # Whichever device FAISS ran on, the GPU run's own ranked lists are the exact search
    # over the GPU run's embeddings.
    from hierdctl.retrieval import build_index, search

    img, txt = np.load(eval_pair["dev_dir"] / "image_emb.npy"), np.load(eval_pair["dev_dir"] / "text_emb.npy")
    check_search_is_exact(img, txt, search(build_index(img, "flat", use_gpu=False)[0], txt, 10))


def test_torch_search_on_cuda_is_exact(eval_pair):
    # Without faiss-gpu, torch on the GPU (matmul + topk) is hierdctl's GPU index: it must
    # return the exact top-k, as FAISS's IndexFlatIP on the CPU does.
    img = np.load(eval_pair["dev_dir"] / "image_emb.npy")
    txt = np.load(eval_pair["dev_dir"] / "text_emb.npy")
    for gallery, queries in ((img, txt), (txt, img)):
        g = torch.from_numpy(gallery).cuda()
        ids = (torch.from_numpy(queries).cuda() @ g.T).topk(10, dim=1).indices.cpu().numpy()
        check_search_is_exact(gallery, queries, ids)


def test_faiss_gpu_index_is_exact(eval_pair):
    from hierdctl.retrieval import build_index, faiss_gpus, search

    if faiss_gpus() == 0:
        pytest.skip("faiss-gpu is not installed (faiss-cpu only: the CUDA 12 faiss-gpu wheel is 135 MB plus "
                    "cuBLAS, too big to travel): eval-retrieval searched on the CPU; torch on the GPU is checked")
    assert eval_pair["dev"]["index"]["device"] == "gpu"
    img = np.load(eval_pair["dev_dir"] / "image_emb.npy")
    txt = np.load(eval_pair["dev_dir"] / "text_emb.npy")
    for gallery, queries in ((img, txt), (txt, img)):
        index, info = build_index(gallery, "flat", use_gpu=True)
        assert info.device == "gpu" and info.exact
        check_search_is_exact(gallery, queries, search(index, queries, 10))


# ----------------------------------------------------------------------------------
# distill --decode gpu: nvJPEG decode and the views replayed on the device
# ----------------------------------------------------------------------------------


def gpu_decode_gap(device: str) -> tuple[float, float, int]:
    """(mean, max) grey-level difference between gpu_decode.BatchDecoder on `device` and the
    PIL path (decode_rgb + apply_view) over crops with and without flip and eval views of 320×256
    JPEGs at 64 px, and how many rows the device left to the CPU."""
    from open_clip.transform import image_transform

    from conftest import image_bytes
    from hierdctl import gpu_decode, images

    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    tf = image_transform(64, is_train=False, mean=mean, std=std)
    plan = images.eval_plan(tf)
    rng = np.random.default_rng(0)
    datas, views = [], []
    for i in range(8):
        data = image_bytes(i, size=(320, 256))
        datas += [data] * 3
        views += [images.View("crop", images.random_resized_crop_box(rng, 320, 256, (0.3, 1), (0.75, 1.33)), False),
                  images.View("crop", images.random_resized_crop_box(rng, 320, 256, (0.3, 1), (0.75, 1.33)), True),
                  images.View("eval", images.eval_box(320, 256))]
    items = [gpu_decode.encode_item(d, v, 64, mean, std, tf, plan) | {"index": torch.tensor(k), "bad": ""}
             for k, (d, v) in enumerate(zip(datas, views))]
    dec = gpu_decode.BatchDecoder(64, mean, std, plan, device, tf)
    out = dec(gpu_decode.collate(items)).cpu()
    want = torch.stack([images.apply_view(images.decode_rgb(d)[0], v, 64, mean, std, tf) for d, v in zip(datas, views)])
    diff = ((out - want) * torch.tensor(std).view(1, 3, 1, 1) * 255).abs()
    return float(diff.mean()), float(diff.max()), dec.on_cpu


def test_gpu_decode_on_cuda_matches_the_pil_path():
    # On the CPU (libjpeg-turbo, the float resize) this gives mean 0.03, max 10 grey levels;
    # nvJPEG's IDCT and chroma upsampling may differ from libjpeg's by a level or two more.
    mean, mx, on_cpu = gpu_decode_gap("cuda")
    assert on_cpu == 0, "nvJPEG refused a baseline JPEG"
    assert mean <= 1.0 and mx <= 48, (mean, mx)

"""Benchmark distill's per-sample loader work at 224 px from 256-px and 512-px JPEGs, and the
cores a GPU needs to be fed at a ViT-T/16 student's step rate, in one run:

  before             the path before issue 23: decode_rgb (full size) + apply_view (PIL's
                     bicubic resize(box=), ToTensor + Normalize; the eval view through
                     open_clip's eval transform), with numpy's .npy and tarfile's header parsers
  no draft           images.decode_view, draft_from=0: the region cut and resized by PyTorch's
                     antialiased bicubic on uint8, the eval view likewise; the cache reader's
                     own .npy and tar header parsing (both contenders below have them too)
  after              images.decode_view as distill runs it: the above, plus libjpeg's
                     DCT-scaled decoding (Image.draft) where the region is scaled down >= 4x
  draft from 2x      images.decode_view, draft_from=2: a draft already at 2x
  gpu: worker part   --decode gpu: what the loader worker still does (header check, the
                     JPEG's bytes into a tensor, everything but the image); the decoding and
                     cutting happen on the device

Each contender is distill's whole per-sample loader work (`CacheDataset.__getitem__`: read
the sample's span, decode its members, the image, cut the view, tokenise, the teacher's
features), one process, one torch thread. "Per core" is samples per CPU-second of this
process (time.process_time), which other jobs on a shared machine do not dilute; the
wall-clock rate is given beside it. Rounds alternate the contenders (their order rotating);
figures are medians over rounds, ratios per round (of CPU-time rates).

The images are scikit-image's sample photos (real photographs, bundled with it), cut at
random (60-100 % of each side) and resized so their shorter side is 256 or 512 px
(img2dataset's keep_ratio), JPEG quality 95 (img2dataset's default); cached by a tiny random
teacher with 2 views (eval + RandomResizedCrop at open_clip's default scale 0.9-1 + flip),
8 clusters, up to 4 phrases, so a sample holds what a HieRD cache holds.

The step rate: the FLOPs of a ViT-T-16 student's image (224 px) and text (77 tokens, and 32:
distill cuts the padding after a batch's longest caption) forward, counted by hand (checked
against FlopCounterMode, which on the CPU counts the matmuls but not the attention kernel),
times 3 for forward + backward, at 40 % of the H200's dense bf16 peak (989.4 TFLOP/s). Cores
needed = 1.2 x step rate / (samples/s per core) (the issue's target: the stream at >= 1.2x
the step rate).

With --device cuda, also the device part of --decode gpu: gpu_decode.BatchDecoder on batches
of the cache's JPEGs (decode + crop + resize + normalise), synchronised.

    python bench/bench_stream.py [--samples 192] [--rounds 5] [--sizes 256,512] [--needs global|hierd] [--device cuda]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

H200_BF16_TFLOPS = 989.4  # dense bf16 peak, NVIDIA's data sheet (H100 SXM's compute)
MFU = 0.40
TARGET = 1.2  # the stream at >= 1.2x the step rate

WORDS = (["a", "the", "two", "an old", "a small", "a red", "a wooden", "a quiet"],
         ["dog", "woman", "rocket", "cup of coffee", "cat", "street", "galaxy", "boat", "table"],
         ["on", "next to", "under", "in front of", "near", "behind"],
         ["a bench", "the sea", "a window", "the launch pad", "a white plate", "the park", "a city at night"])


def photos() -> tuple[list, str]:
    """(images as (H,W,3) uint8, what they are): scikit-image's bundled colour photographs, or,
    where scikit-image is not installed (the GPU machine), natural-statistics stand-ins."""
    try:
        import skimage.data as d
    except ImportError:
        return pink_noise_images(8), "1/f-noise colour images (scikit-image is not installed here)"
    return [d.astronaut(), d.chelsea(), d.coffee(), d.rocket(), d.immunohistochemistry(),
            d.hubble_deep_field(), d.retina(), d.stereo_motorcycle()[0]], "scikit-image's sample photos"


def pink_noise_images(n: int, h: int = 768, w: int = 1024) -> list:
    """Colour images with a 1/f^1.5 amplitude spectrum, channels correlated as in photographs:
    at quality 95 their JPEGs are about the size of the photos' (40 / 131 kB at 256 / 512 px
    against 38 / 116 kB), so about as costly to decode."""
    rng = np.random.default_rng(7)
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :]
    amp = 1.0 / np.maximum(np.hypot(fy, fx), 1.0 / max(h, w)) ** 1.5
    out = []
    for _ in range(n):
        base = np.fft.irfft2(amp * np.exp(2j * np.pi * rng.random(amp.shape)), s=(h, w))
        chans = [base + 0.35 * np.fft.irfft2(amp * np.exp(2j * np.pi * rng.random(amp.shape)), s=(h, w))
                 for _ in range(3)]
        a = np.stack(chans, -1)
        lo, hi = np.percentile(a, 1), np.percentile(a, 99)
        out.append(np.clip((a - lo) / (hi - lo) * 255, 0, 255).astype(np.uint8))
    return out


def make_source(root: Path, n: int, short: int, per_shard: int, seed: int) -> str:
    """n JPEGs (shorter side `short`, keep_ratio, quality 95) with captions, img2dataset's layout."""
    from PIL import Image

    from conftest import write_tar

    rng = np.random.default_rng(seed)
    pics, _ = photos()
    root.mkdir(parents=True, exist_ok=True)
    samples = []
    for i in range(n):
        a = pics[i % len(pics)]
        h, w = a.shape[:2]
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        s = short / min(cw, ch)
        img = Image.fromarray(a).resize((round(cw * s), round(ch * s)), Image.BICUBIC, box=(x, y, x + cw, y + ch))
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=95)
        cap = " ".join(str(rng.choice(p)) for p in WORDS)
        samples.append({"key": f"{i:09d}", "jpg": buf.getvalue(), "txt": cap, "json": {"key": f"{i:09d}"}})
    shards = (n + per_shard - 1) // per_shard
    for s in range(shards):
        write_tar(root / f"{s:05d}.tar", samples[s * per_shard : (s + 1) * per_shard])
    return str(root / ("{00000..%05d}.tar" % (shards - 1)))


# ----------------------------------------------------------------------------------
# FLOPs of the ViT-T-16 student and the step rate they allow
# ----------------------------------------------------------------------------------


def vit_forward_macs(tokens: int, width: int, layers: int, mlp: int) -> int:
    """Multiply-accumulates of a pre-norm transformer's forward: per layer and token, q/k/v/out
    projections 4·w², the MLP 2·w·mlp; attention scores and their weighted sum 2·n·w per token."""
    return layers * (tokens * (4 * width * width + 2 * width * mlp) + 2 * tokens * tokens * width)


def student_flops(text_tokens: int = 77) -> dict:
    """The ViT-T-16 student's FLOPs per sample: by hand (shown) and by FlopCounterMode."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from hierdctl.specs import create_open_clip, parse_spec
    from hierdctl.student import encode_text_trimmed

    cfg = json.loads((Path(__file__).resolve().parents[1] / "hierdctl" / "model_configs" / "ViT-T-16.json").read_text())
    v, t, d = cfg["vision_cfg"], cfg["text_cfg"], cfg["embed_dim"]
    grid = v["image_size"] // v["patch_size"]
    n_img = grid * grid + 1  # patches + class token
    img = vit_forward_macs(n_img, v["width"], v["layers"], 4 * v["width"])
    patch = grid * grid * (3 * v["patch_size"] ** 2) * v["width"]
    txt = vit_forward_macs(text_tokens, t["width"], t["layers"], 4 * t["width"])
    heads = v["width"] * d + t["width"] * d  # the two projections into the joint space
    hand = 2 * (img + patch + txt + heads)  # FLOPs = 2 x MACs

    model, _, _, _ = create_open_clip(parse_spec("open_clip:ViT-T-16", "--student"), "cpu", "--student")
    model.train()
    x = torch.randn(1, 3, v["image_size"], v["image_size"])
    tok = torch.zeros(1, t["context_length"], dtype=torch.long)  # a caption of `text_tokens` tokens, padded
    tok[0, :text_tokens] = torch.randint(1, 49407, (text_tokens,))
    with FlopCounterMode(display=False) as fwd:
        with torch.no_grad():
            model.encode_image(x)
            encode_text_trimmed(model, tok)  # what distill runs: the padding after the batch's last token is cut
    with FlopCounterMode(display=False) as both:
        loss = model.encode_image(x).sum() + encode_text_trimmed(model, tok).sum()
        loss.backward()
    attention = 2 * (v["layers"] * 2 * n_img * n_img * v["width"] + t["layers"] * 2 * text_tokens ** 2 * t["width"])
    return {"image_macs": img, "patch_macs": patch, "text_macs": txt, "head_macs": heads, "hand_forward": hand,
            "attention_flops": attention,
            "counted_forward": fwd.get_total_flops(), "counted_forward_backward": both.get_total_flops(),
            "n_img_tokens": n_img, "text_tokens": text_tokens, "cfg": cfg}


# ----------------------------------------------------------------------------------
# The contenders
# ----------------------------------------------------------------------------------


def datasets(work: Path, name: str, needs: dict):
    """{contender: CacheDataset} over the cache `work/name`, the ViT-T-16 student's I/O."""
    import open_clip
    from open_clip.transform import image_transform

    from hierdctl import cache_format
    from hierdctl.images import apply_view, decode_rgb, decode_view

    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    io_ = {"image_size": 224, "mean": mean, "std": std, "grid_size": 196,
           "eval_transform": image_transform(224, is_train=False, mean=mean, std=std),
           "tokenize": open_clip.get_tokenizer("ViT-B-32")}  # CLIP's tokenizer: ViT-T-16's

    class Before(cache_format.CacheDataset):  # the per-sample image work before issue 23
        def pixels(self, data, view):
            img, _ = decode_rgb(data)
            return {"image": apply_view(img, view, 224, mean, std, io_["eval_transform"])}

    def drafting(scale: int):
        class Drafting(cache_format.CacheDataset):
            def pixels(self, data, view):
                return {"image": decode_view(data, view, 224, mean, std, io_["eval_transform"], self.plan,
                                             draft_from=scale)}
        return Drafting

    cache = cache_format.open_cache(work / name)
    spans = cache_format.check_shards(cache)
    out = {"before": Before(cache, spans, 0, "random", "random", io_, needs),
           "no draft": drafting(0)(cache, spans, 0, "random", "random", io_, needs),
           "after": cache_format.CacheDataset(cache, spans, 0, "random", "random", io_, needs),
           "draft from 2x": drafting(2)(cache, spans, 0, "random", "random", io_, needs),
           "gpu: worker part": cache_format.CacheDataset(cache, spans, 0, "random", "random", io_ | {"decode": "gpu"},
                                                         needs)}
    assert out["after"].plan is not None, "open_clip's eval transform should be recognised"
    return out


def one_pass(ds, epoch: int) -> tuple[float, float]:
    """(samples per CPU-second, samples per wall-second) of one pass in a seeded random order."""
    order = np.random.default_rng(epoch).permutation(len(ds))
    c0, t0 = time.process_time(), time.perf_counter()
    for i in order:
        assert not ds[(int(i), epoch)]["bad"]
    return len(order) / (time.process_time() - c0), len(order) / (time.perf_counter() - t0)


def device_decode_rate(ds, device: str, batch: int, rounds: int) -> dict:
    """samples/s of gpu_decode.BatchDecoder on `device` over batches of the data set's items."""
    import torch

    from hierdctl.gpu_decode import BatchDecoder, collate

    n = (len(ds) // batch) * batch
    batches = [collate([ds[(i, 0)] for i in range(a, a + batch)]) for a in range(0, n, batch)]
    dec = BatchDecoder(224, ds.io["mean"], ds.io["std"], ds.plan, device, ds.io["eval_transform"], ds.where)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def run():
        for b in batches:
            dec(dict(b))  # a shallow copy: the decoder pops its fields
        sync()

    run()  # warm-up (nvJPEG handles, kernels)
    rates = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        run()
        rates.append(n / (time.perf_counter() - t0))
    return {"samples_per_s": statistics.median(rates), "batch": batch, "batches": len(batches),
            "on_cpu": dec.on_cpu, "device": device}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=192, help="JPEGs per source size")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--sizes", default="256,512", help="the JPEGs' shorter side, px")
    p.add_argument("--needs", choices=("global", "hierd"), default="global",
                   help="what the recipe reads: global (clip-kd, clip-rd) or hierd (+ clusters, phrases)")
    p.add_argument("--device", default="cpu", help="cuda: also time the device part of --decode gpu")
    p.add_argument("--batch", type=int, default=64, help="batch of the device decode timing")
    p.add_argument("--no-flops", action="store_true", help="skip counting the student's FLOPs (smoke runs)")
    args = p.parse_args()

    import torch

    from conftest import TINY_CFG, make_tiny_model, save_local_dir
    from hierdctl.configs import CacheTeacherConfig
    from hierdctl.stages.cache_teacher import run as cache_run

    torch.set_num_threads(1)
    load0 = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="bench-stream-"))
    teacher = f"local-dir:{save_local_dir(make_tiny_model(), TINY_CFG, work / 'teacher')}"
    sizes = [int(s) for s in args.sizes.split(",")]
    needs = {"global": True, "clusters": args.needs == "hierd", "phrases": args.needs == "hierd",
             "mask_noise": False}
    sets, jpeg_kb = {}, {}
    for short in sizes:
        src = make_source(work / f"src{short}", args.samples, short, max(1, args.samples // 4), seed=short)
        cache_run(CacheTeacherConfig(source=src, out=work / f"cache{short}", teacher=teacher, views=2, clusters=8,
                                     max_phrases=4, workers=0, quiet=True))
        sets[short] = datasets(work, f"cache{short}", needs)
        with tarfile.open(next((work / f"src{short}").glob("*.tar"))) as tf:
            sizes_b = [m.size for m in tf if m.name.endswith(".jpg")]
        jpeg_kb[short] = sum(sizes_b) / len(sizes_b) / 1e3

    names = list(next(iter(sets.values())))
    rates = {(s, n): [] for s in sizes for n in names}  # samples per CPU-second
    walls = {(s, n): [] for s in sizes for n in names}  # samples per wall-second
    ratios = {(s, n): [] for s in sizes for n in names}
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for r in range(args.rounds):
        for s in sizes:
            got = {}
            for n in names[r % len(names):] + names[: r % len(names)]:
                got[n], wall = one_pass(sets[s][n], r)
                rates[(s, n)].append(got[n])
                walls[(s, n)].append(wall)
            for n in names:
                ratios[(s, n)].append(got[n] / got["before"])
    load1 = os.getloadavg()
    share = (time.process_time() - cpu0) / (time.perf_counter() - wall0)  # of one core, while timed

    med = {k: statistics.median(v) for k, v in rates.items()}
    res = {"samples": args.samples, "rounds": args.rounds, "needs": args.needs, "jpeg_kb": jpeg_kb,
           "loadavg": [load0[0], load1[0]], "cpus": len(os.sched_getaffinity(0)), "cpu_share": share,
           "per_core": {f"{s}/{n}": med[(s, n)] for s in sizes for n in names},
           "wall": {f"{s}/{n}": statistics.median(walls[(s, n)]) for s in sizes for n in names},
           "ratio_to_before": {f"{s}/{n}": statistics.median(ratios[(s, n)]) for s in sizes for n in names}}
    print(f"\n**distill's per-sample loader work at 224 px** — {args.samples} JPEGs per size ({photos()[1]}, "
          f"shorter side {'/'.join(map(str, sizes))} px, quality 95, mean "
          + ", ".join(f"{jpeg_kb[s]:.0f} kB" for s in sizes) + f"), 2 views (eval + RRC 0.9-1 + flip), needs "
          f"`{args.needs}`, {args.rounds} rounds alternating, 1 process, 1 torch thread; load average "
          f"{load0[0]:.1f} → {load1[0]:.1f} on {res['cpus']} cores (this process got {share:.0%} of a core)\n")
    print("| contender | " + " | ".join(f"{s} px: samples/s per core (CPU time) | ms | wall samples/s | × before"
                                       for s in sizes) + " |\n|---|" + "---:|---:|---:|---:|" * len(sizes))
    for n in names:
        print(f"| {n} | " + " | ".join(f"{med[(s, n)]:,.0f} | {1e3 / med[(s, n)]:.2f} | "
                                       f"{res['wall'][f'{s}/{n}']:,.0f} | "
                                       f"{res['ratio_to_before'][f'{s}/{n}']:.2f}" for s in sizes) + " |")

    if not args.no_flops:
        f = student_flops(77)
        f32 = student_flops(32)
        step = {}
        print("\n**The step rate to feed** (ViT-T-16: image 224 px = "
              f"{f['n_img_tokens']} tokens of width {f['cfg']['vision_cfg']['width']}, 12 layers; text "
              f"width {f['cfg']['text_cfg']['width']}, 12 layers)\n")
        print("| text tokens | image fwd | text fwd | fwd total (by hand) | of which attention | FlopCounterMode "
              "fwd (no attention) | fwd+bwd = 3 × fwd | samples/s at 40 % of 989.4 TFLOP/s | × 1.2 (target) |\n"
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for k, ff in (("77", f), ("32", f32)):
            per = 3 * ff["hand_forward"]
            sps = MFU * H200_BF16_TFLOPS * 1e12 / per
            step[k] = {"flops_per_sample": per, "counted_fwd_bwd": ff["counted_forward_backward"],
                       "hand_forward": ff["hand_forward"], "counted_forward": ff["counted_forward"],
                       "attention_flops": ff["attention_flops"], "step_samples_per_s": sps}
            img_g, txt_g = 2 * (ff["image_macs"] + ff["patch_macs"]) / 1e9, 2 * ff["text_macs"] / 1e9
            print(f"| {k} | {img_g:.3f} G | {txt_g:.3f} G "
                  f"| {ff['hand_forward'] / 1e9:.3f} G | {ff['attention_flops'] / 1e9:.3f} G | "
                  f"{ff['counted_forward'] / 1e9:.3f} G | {per / 1e9:.2f} G | {sps:,.0f} | {TARGET * sps:,.0f} |")
        w, L = f["cfg"]["vision_cfg"]["width"], f["cfg"]["vision_cfg"]["layers"]
        tw = f["cfg"]["text_cfg"]["width"]
        print(f"\nBy hand, per layer and token: 4·w² (q, k, v, out) + 2·w·4w (MLP) MACs, plus 2·n·w for the "
              f"attention; image: {L} × ({f['n_img_tokens']} × 12 × {w}² + 2 × {f['n_img_tokens']}² × {w}) "
              f"= {f['image_macs'] / 1e9:.4f} G MACs + patch embedding {f['patch_macs'] / 1e9:.4f} G; "
              f"text at 77 tokens: "
              f"12 × (77 × 12 × {tw}² + 2 × 77² × {tw}) = {f['text_macs'] / 1e9:.4f} G MACs; FLOPs = 2 × MACs. "
              f"FlopCounterMode on the CPU counts the same matmuls (hand − attention = "
              f"{(f['hand_forward'] - f['attention_flops']) / 1e9:.3f} G against its "
              f"{f['counted_forward'] / 1e9:.3f} G) but has no formula for the CPU's attention kernel. "
              f"Forward + backward ≈ 3 × forward (FlopCounterMode: "
              f"{f['counted_forward_backward'] / f['counted_forward']:.2f} ×; the pixels need no gradient). "
              f"Step rate = 0.40 × 989.4e12 / (3 × forward FLOPs by hand).\n")
        res["step"] = step
        print("| source | contender | samples/s per core | cores for 1.2 × step rate, 77-token text | "
              "32-token text |\n|---|---|---:|---:|---:|")
        res["cores"] = {}
        for s in sizes:
            for n in names:
                c77 = TARGET * step["77"]["step_samples_per_s"] / med[(s, n)]
                c32 = TARGET * step["32"]["step_samples_per_s"] / med[(s, n)]
                res["cores"][f"{s}/{n}"] = {"77": c77, "32": c32}
                print(f"| {s} px | {n} | {med[(s, n)]:,.0f} | {c77:,.0f} | {c32:,.0f} |")
        print("\n(gpu: worker part is the CPU's share only: the device then decodes and cuts, measured on a GPU "
              "with --device cuda.)")

    res["device_decode"] = {}
    for s in sizes:
        dd = device_decode_rate(sets[s]["gpu: worker part"], args.device, min(args.batch, args.samples), 3)
        res["device_decode"][str(s)] = dd
        print(f"\ngpu_decode.BatchDecoder on {args.device}, {s}-px JPEGs, batch {dd['batch']}: "
              f"{dd['samples_per_s']:,.0f} samples/s" + (" (torchvision's CPU decode: the fallback the tests "
                                                          "compare, not a GPU figure)" if args.device == "cpu" else ""))
    print(json.dumps(res), file=sys.stderr)


if __name__ == "__main__":
    main()

"""Shared fixtures: a tiny random-initialised open_clip teacher saved as a local dir, and
small img2dataset-layout shards. Everything is made on the fly; nothing is downloaded."""

from __future__ import annotations

import contextlib
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HIERDCTL_NO_PROGRESS", "1")

TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}

CAPTIONS = [
    "a red circle next to a blue square",
    "a small green triangle on a white table",
    "two dogs playing with a yellow ball in the park",
    "a man riding a bicycle down the street",
    "a bowl of fruit on a wooden table",
    "a black cat sleeping on a sofa",
]


def save_local_dir(model, cfg: dict, path: Path) -> Path:
    """open_clip's local-dir layout: open_clip_config.json + open_clip_model.safetensors."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "open_clip_model.safetensors"))
    return path


def make_tiny_model(cfg=TINY_CFG, seed=0):
    import torch

    import open_clip
    torch.manual_seed(seed)
    return open_clip.CLIP(**cfg)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> str:
    d = save_local_dir(make_tiny_model(), TINY_CFG, tmp_path_factory.mktemp("teacher") / "tiny")
    return f"local-dir:{d}"


def image_bytes(i: int, size=(48, 40), fmt="JPEG", mode="RGB") -> bytes:
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(i)
    img = Image.new("RGB", size, tuple(int(c) for c in rng.integers(0, 255, 3)))
    d = ImageDraw.Draw(img)
    for _ in range(3):
        x0, y0 = rng.integers(0, size[0] // 2), rng.integers(0, size[1] // 2)
        d.ellipse([x0, y0, x0 + size[0] // 3, y0 + size[1] // 3], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def write_tar(path: Path, samples: list[dict]) -> Path:
    """samples: {'key', 'jpg'|'png'|..: bytes, 'txt': str, 'json'?: dict}"""
    with tarfile.open(path, "w") as tf:
        for s in samples:
            for ext, val in s.items():
                if ext == "key":
                    continue
                data = val if isinstance(val, bytes) else (json.dumps(val) if ext == "json" else val).encode()
                info = tarfile.TarInfo(f"{s['key']}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def make_shards(root: Path, n_shards=2, per_shard=5, start=0) -> str:
    root.mkdir(parents=True, exist_ok=True)
    i = start
    for s in range(n_shards):
        samples = []
        for _ in range(per_shard):
            samples.append({"key": f"{i:09d}", "jpg": image_bytes(i), "txt": CAPTIONS[i % len(CAPTIONS)],
                            "json": {"key": f"{i:09d}", "caption": CAPTIONS[i % len(CAPTIONS)]}})
            i += 1
        write_tar(root / f"{s:05d}.tar", samples)
    return str(root / ("{00000..%05d}.tar" % (n_shards - 1)))


@pytest.fixture()
def shards(tmp_path) -> str:
    return make_shards(tmp_path / "data")


@contextlib.contextmanager
def http_server(directory: Path):
    """http://127.0.0.1:PORT serving `directory` from a thread, stopped on exit. Nothing but
    127.0.0.1 is ever contacted (use with the `no_proxy` fixture so curl ignores proxies)."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        timeout = 30  # a stuck client cannot hold a handler thread longer

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture()
def no_proxy(monkeypatch):
    """curl follows proxy variables: never let it reach anything but 127.0.0.1."""
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")

"""Scenes benchmark: captions are true, negatives false, images match the scene graph,
shards are deterministic and readable, Fashion-MNIST is read from IDX files."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hierdctl import scenes_assets
from hierdctl.stages import scenes as S
from hierdctl.errors import UserError

DEBIAN_FASHION = Path(S.DEFAULT_FASHION_DIRS[0])


def _scenes(cfg: S.ScenesConfig, n: int, split_id: int = 1, assets: S.Assets | None = None):
    """n (scene, rng) pairs, the rng positioned after make_scene as in make_sample."""
    if assets is None and cfg.flavour == "cluttered":
        assets = S.load_assets(cfg, "train" if split_id == 0 else "test")
    for i in range(n):
        rng = np.random.default_rng([cfg.seed, split_id, i])
        yield S.make_scene(rng, cfg, assets), rng


def _tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data, mtime=0) if compress else data)


def _fake_fashion(folder: Path) -> Path:
    """A tiny Fashion-MNIST: three 28x28 photos per class, each a bright block with a
    darker stripe (so shading varies). Train files gzipped, test files plain."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    for split, compress in (("train", True), ("t10k", False)):
        labels = np.repeat(np.arange(10), 3)
        images = np.zeros((len(labels), 28, 28), np.uint8)
        for k in range(len(labels)):
            h, w = rng.integers(10, 25, size=2)
            top, left = (28 - h) // 2, (28 - w) // 2
            images[k, top : top + h, left : left + w] = rng.integers(150, 256)
            images[k, top + h // 2, left : left + w] = 90
        suffix = ".gz" if compress else ""
        _write_idx(folder / f"{split}-images-idx3-ubyte{suffix}", images, compress)
        _write_idx(folder / f"{split}-labels-idx1-ubyte{suffix}", labels, compress)
    return folder


def _shape_colour_check(image: np.ndarray, scene: S.Scene) -> None:
    """Every object's exact colour covers a good part of its box, and appears nowhere
    outside the boxes of the objects that have that colour."""
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.bbox
        colour = np.array(S.COLOURS[obj.colour])
        close = np.abs(image.astype(int) - colour).max(axis=2) <= 8
        inside = close[y0:y1, x0:x1].sum()
        assert inside >= 0.1 * (x1 - x0) * (y1 - y0), (obj, inside)
        outside = close.copy()
        for other in scene.objects:
            if other.colour == obj.colour:
                ox0, oy0, ox1, oy1 = other.bbox
                outside[oy0:oy1, ox0:ox1] = False
        assert not outside.any(), obj


def _tint_check(image: np.ndarray, scene: S.Scene) -> None:
    """Fashion items are their colour scaled by a 70–100% shade: enough pixels in each
    box must lie on that colour's ray within the shade range."""
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.bbox
        c = np.array(S.COLOURS[obj.colour], float)
        px = image[y0:y1, x0:x1].reshape(-1, 3).astype(float)
        shade = px @ c / (c @ c)
        on_ray = (np.abs(px - shade[:, None] * c).max(axis=1) <= 6) & (shade >= 0.65) & (shade <= 1.02)
        assert on_ray.sum() >= 5, (obj, on_ray.sum())


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "field, value, flag",
    [
        ("flavour", "mnist", "--flavour"),
        ("n_train", -1, "--n-train"),
        ("n_test", 1.5, "--n-test"),
        ("n_train", 10**9, "--n-train"),
        ("image_size", 16, "--image-size"),
        ("shard_size", 0, "--shard-size"),
        ("seed", -3, "--seed"),
        ("min_objects", 0, "--min-objects"),
        ("max_objects", 5, "--max-objects"),
        ("clip_benchmark", "yes", "--clip-benchmark"),
        ("captions_per_image", 0, "--captions-per-image"),
        ("negatives_per_kind", 9, "--negatives-per-kind"),
        ("image_format", "webp", "--image-format"),
        ("textured_fraction", 1.5, "--textured-fraction"),
        ("out", "", "--out"),
    ],
)
def test_bad_config_raises_user_error(field, value, flag):
    cfg = S.ScenesConfig(**{field: value})
    with pytest.raises(UserError) as err:
        cfg.validate()
    assert err.value.where == flag


def test_bad_config_combinations(tmp_path):
    with pytest.raises(UserError, match="--max-objects"):
        S.ScenesConfig(min_objects=3, max_objects=2).validate()
    with pytest.raises(UserError, match="--n-train"):
        S.ScenesConfig(n_train=0, n_test=0).validate()
    with pytest.raises(UserError, match="--fashion-path"):  # shapes never read Fashion-MNIST
        S.ScenesConfig(fashion_path=tmp_path).validate()
    with pytest.raises(UserError, match="--fashion-path"):
        S.ScenesConfig(flavour="fashion", fashion_path=tmp_path / "missing").validate()
    with pytest.raises(UserError, match="no train-images-idx3-ubyte"):  # an empty folder
        S.ScenesConfig(flavour="fashion", fashion_path=tmp_path).validate()
    with pytest.raises(UserError, match="no t10k-images-idx3-ubyte"):  # only the split in use is needed
        S.ScenesConfig(flavour="fashion", fashion_path=tmp_path, n_train=0).validate()
    assert S.ScenesConfig().validate().flavour == "shapes"


def test_object_range_and_texture_follow_the_flavour():
    assert S.ScenesConfig().object_range() == (1, 4)
    assert S.ScenesConfig(flavour="cluttered").object_range() == (2, 6)
    assert S.ScenesConfig(flavour="cluttered", max_objects=3).object_range() == (2, 3)
    S.ScenesConfig(flavour="cluttered", min_objects=6).validate()
    with pytest.raises(UserError, match="--max-objects.* to 4 for shapes"):
        S.ScenesConfig(max_objects=6).validate()
    with pytest.raises(UserError, match="--max-objects.* to 6 for cluttered"):
        S.ScenesConfig(flavour="cluttered", max_objects=7).validate()
    # Cluttered backgrounds are photos: a mottled share would be a flag that does nothing.
    with pytest.raises(UserError) as err:
        S.ScenesConfig(flavour="cluttered", textured_fraction=0.2).validate()
    assert err.value.where == "--textured-fraction"
    assert S.ScenesConfig().texture_share() == 0.5
    with pytest.raises(UserError, match="--clip-benchmark"):
        S.ScenesConfig(n_test=0, clip_benchmark=True).validate()


def test_every_error_names_a_flag_of_the_scenes_command():
    import inspect

    import typer

    from hierdctl.cli import app

    command = typer.main.get_command(app).commands["scenes"]
    flags = {opt for param in command.params for opt in param.opts}
    source = Path(S.__file__).read_text() + inspect.getsource(S.ScenesConfig)  # the generator and its config
    named = set(re.findall(r'where="(--[a-z-]+)"', source))
    assert named >= {"--out", "--flavour", "--fashion-path", "--image-format", "--textured-fraction", "--clip-benchmark"}
    assert named <= flags, named - flags
    # Every field of the config is a flag (out is --out).
    fields = {f.replace("_", "-") for f in vars(S.ScenesConfig())} - {"out-dir"}
    assert {f"--{f}" for f in fields} <= flags, {f"--{f}" for f in fields} - flags


def test_out_dir_guard_and_stale_shards(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(UserError) as err:
        S.run(S.ScenesConfig(out=tmp_path / "busy", n_train=1, n_test=1))
    assert err.value.where == "--out"

    out = tmp_path / "o"
    S.run(S.ScenesConfig(out=out, n_train=9, n_test=1, shard_size=3))
    assert len(list((out / "train").glob("*.tar"))) == 3
    # Regenerating smaller over it drops the shards that no longer belong.
    summary = S.run(S.ScenesConfig(out=out, n_train=4, n_test=1, shard_size=3, image_format="jpg"))
    assert sorted(p.name for p in (out / "train").glob("*.tar")) == ["00000.tar", "00001.tar"]
    assert summary["counts"] == {"train": 4, "test": 1}
    assert "000000003.jpg" in _tar_members(out / "train" / "00001.tar")


# --------------------------------------------------------------------------- captions


def test_checker_on_hand_made_scene():
    left = S.SceneObject("circle", "red", "small", (4, 20, 17, 33))
    right = S.SceneObject("square", "blue", "large", (36, 2, 58, 24))
    scene = S.Scene([left, right], 64, "shapes", (220, 220, 220), None, 8.0)
    assert S.relations(scene) == [(0, "left of", 1), (0, "below", 1), (1, "right of", 0), (1, "above", 0)]
    true = [
        "a small red circle to the left of a large blue square",
        "a large blue square is right of a small red circle",
        "two objects: a red circle and a blue square",
        "there is a red circle below a blue square, and a blue square is above a red circle",
        "A picture of a small red circle.",
    ]
    false = [
        "a small blue circle to the left of a large red square",  # swapped colours
        "a large red circle left of a small blue square",  # swapped sizes
        "a small red circle to the right of a large blue square",  # flipped relation
        "a large blue square is left of a small red circle",  # swapped order
        "a small red star to the left of a large blue square",  # replaced object
        "one object: a red circle",  # wrong count
        "three objects: a red circle, a blue square and a blue square",
        "a red circle left of a blue square, and a red circle above a blue square",
    ]
    for caption in true:
        assert S.scene_satisfies(scene, caption), caption
    for caption in false:
        assert not S.scene_satisfies(scene, caption), caption
    for garbage in ("a red blob left of a blue square", "red circle", "two objects: a red circle"):
        with pytest.raises(ValueError):
            S.scene_satisfies(scene, garbage)


def test_captions_true_and_negatives_false():
    cfg = S.ScenesConfig()
    kinds_seen = {k: 0 for k in S.NEGATIVE_KINDS}
    for scene, rng in _scenes(cfg, 300):
        caps = S.captions(scene, rng, 5)
        assert len(caps) == len(set(caps)) == 5
        for caption in caps:
            assert S.scene_satisfies(scene, caption), (caption, scene)
        negs = S.hard_negatives(scene, rng, 3)
        assert set(negs) == set(S.NEGATIVE_KINDS)
        for kind, captions in negs.items():
            assert len(captions) == len(set(captions)) <= 3
            kinds_seen[kind] += len(captions)
            for caption in captions:
                assert not S.scene_satisfies(scene, caption), (kind, caption, scene)
        assert negs["replace_object"]
        if len(scene.objects) == 1:
            assert negs["swap_attribute"] == negs["swap_relation"] == []
        else:
            assert negs["swap_relation"]
    assert all(n > 100 for n in kinds_seen.values()), kinds_seen


def test_scene_rules_make_relations_unambiguous():
    cfg = S.ScenesConfig(min_objects=2)
    for scene, _rng in _scenes(cfg, 200):
        objs = scene.objects
        assert len({(o.colour, o.shape) for o in objs}) == len(objs)  # "colour shape" names one object
        for i, a in enumerate(objs):
            assert 0 <= a.bbox[0] < a.bbox[2] <= 64 and 0 <= a.bbox[1] < a.bbox[3] <= 64
            for j in range(i + 1, len(objs)):
                assert S._pair_relations(scene, i, j), "every pair is clearly related"
        for i, rel, j in S.relations(scene):
            assert not S.holds(scene, i, S.FLIPPED[rel], j)
            (xi, yi), (xj, yj) = objs[i].centre, objs[j].centre
            assert max(abs(xi - xj), abs(yi - yj)) >= scene.margin


# --------------------------------------------------------------------------- rendering


def test_render_puts_each_colour_in_its_box():
    for size in (64, 96):
        cfg = S.ScenesConfig(image_size=size)
        assets = S.load_assets(cfg)
        for scene, _rng in _scenes(cfg, 60):
            image = np.asarray(S.render(scene, cfg, assets))
            assert image.shape == (size, size, 3)
            _shape_colour_check(image, scene)


# --------------------------------------------------------------------------- shards


def test_run_is_deterministic_and_independent_of_sharding(tmp_path):
    def cfg(out, shard_size):
        return S.ScenesConfig(out=tmp_path / out, n_train=23, n_test=11, shard_size=shard_size, seed=7)

    S.run(cfg("a", 8))
    S.run(cfg("b", 8))
    files_a, files_b = _all_files(tmp_path / "a"), _all_files(tmp_path / "b")
    assert sorted(files_a) == ["scenes.json", "test/00000.tar", "test/00001.tar", "test/stats.json",
                               "train/00000.tar", "train/00001.tar", "train/00002.tar", "train/stats.json"]  # fmt: skip
    assert files_a == files_b

    S.run(cfg("c", 5))
    for split in ("train", "test"):
        samples = [{}, {}]
        for k, root in enumerate((tmp_path / "a", tmp_path / "c")):
            for shard in sorted((root / split).glob("*.tar")):
                samples[k].update(_tar_members(shard))
        assert samples[0] == samples[1]

    # Train and test draw from disjoint seeds: same keys, different scenes.
    train = _tar_members(tmp_path / "a" / "train" / "00000.tar")
    test = _tar_members(tmp_path / "a" / "test" / "00000.tar")
    assert train["000000000.png"] != test["000000000.png"]
    assert json.loads(train["000000000.json"])["seed"] == [7, 0, 0]
    assert json.loads(test["000000000.json"])["seed"] == [7, 1, 0]


def test_shards_read_back_with_webdataset_and_tarfile(tmp_path):
    wds = pytest.importorskip("webdataset")
    out = tmp_path / "o"
    summary = S.run(S.ScenesConfig(out=out, n_train=10, n_test=6, shard_size=4, captions_per_image=3))
    assert summary["counts"] == {"train": 10, "test": 6}
    manifest = json.loads((out / "scenes.json").read_text())
    assert manifest["version"] == S.GENERATOR_VERSION and manifest["config"]["seed"] == 0
    stats = json.loads((out / "test" / "stats.json").read_text())
    assert stats["count"] == 6 and sum(stats["objects_per_image"].values()) == 6

    for split, n in (("train", 10), ("test", 6)):
        last = len(summary["stats"][split]["shards"]) - 1
        url = str(out / split / ("{00000..%05d}.tar" % last))
        rows = list(wds.WebDataset(url, shardshuffle=False))
        assert [r["__key__"] for r in rows] == [f"{i:09d}" for i in range(n)]
        for row in rows:
            meta = json.loads(row["json"])
            assert set(meta) >= {"key", "captions", "objects", "relations", "flavour", "seed"}
            assert meta["key"] == row["__key__"] and meta["flavour"] == "shapes"
            assert row["txt"].decode() == meta["captions"][0] and len(meta["captions"]) == 3
            assert ("hard_negatives" in meta) == (split == "test")
            assert Image.open(io.BytesIO(row["png"])).size == (64, 64)
            for obj in meta["objects"]:
                assert set(obj) == {"shape", "colour", "size", "bbox"} and len(obj["bbox"]) == 4
            for i, rel, j in meta["relations"]:
                assert rel in S.RELATIONS and 0 <= i < len(meta["objects"]) and 0 <= j < len(meta["objects"])

    with tarfile.open(out / "test" / "00000.tar") as tar:
        members = tar.getmembers()
        assert [m.name for m in members[:3]] == ["000000000.png", "000000000.txt", "000000000.json"]
        assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 for m in members)
    assert not list(out.rglob("*.tmp*"))


def test_every_file_is_written_atomically_and_leftovers_go(tmp_path, monkeypatch):
    from hierdctl import atomic

    synced = []
    real_fsync = atomic.os.fsync
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    out = tmp_path / "o"
    S.run(S.ScenesConfig(out=out, n_train=5, n_test=3, shard_size=2))
    written = [p for p in out.rglob("*") if p.is_file()]
    assert len(written) == 3 + 2 + 2 + 1  # train and test shards, two stats.json, scenes.json
    assert len(synced) == len(written)

    # A kill mid-write leaves NAME.tmpPID (atomic.py's temporary name): the next run removes it.
    leftover = out / "train" / "00001.tar.tmp4242"
    leftover.write_bytes(b"torn")
    S.run(S.ScenesConfig(out=out, n_train=5, n_test=3, shard_size=2))
    assert not leftover.exists()


# --------------------------------------------------------------------------- fashion


def test_read_idx_plain_gzip_and_broken(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "plain", arr, compress=False)
    _write_idx(tmp_path / "packed.gz", arr, compress=True)
    assert np.array_equal(S.read_idx(tmp_path / "plain"), arr)
    assert np.array_equal(S.read_idx(tmp_path / "packed.gz"), arr)
    (tmp_path / "bad").write_bytes(b"PNG\x89not idx")
    (tmp_path / "short").write_bytes((tmp_path / "plain").read_bytes()[:-5])
    for name in ("bad", "short"):
        with pytest.raises(UserError) as err:
            S.read_idx(tmp_path / name)
        assert err.value.where == "--fashion-path"


def test_fashion_flavour_from_fake_idx(tmp_path):
    folder = _fake_fashion(tmp_path / "fmnist")
    cfg = S.ScenesConfig(out=tmp_path / "o", flavour="fashion", fashion_path=folder, n_train=6, n_test=6, shard_size=4)
    summary = S.run(cfg)
    assert summary["config"]["fashion_path"] == str(folder)
    assert summary["vocabulary"]["shapes"] == list(S.FASHION_ITEMS)
    meta = json.loads(_tar_members(tmp_path / "o" / "test" / "00000.tar")["000000000.json"])
    assert meta["flavour"] == "fashion" and meta["objects"][0]["shape"] in S.FASHION_ITEMS

    for split, split_id in (("train", 0), ("test", 1)):
        assets = S.load_assets(cfg, split)
        assert len(assets.fashion_images) == 30
        for scene, rng in _scenes(cfg, 40, split_id):
            _tint_check(np.asarray(S.render(scene, cfg, assets)), scene)
            for caption in S.captions(scene, rng, 4):
                assert S.scene_satisfies(scene, caption)
            for negs in S.hard_negatives(scene, rng).values():
                assert not any(S.scene_satisfies(scene, c) for c in negs)


@pytest.mark.skipif(not DEBIAN_FASHION.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_flavour_from_debian_package(tmp_path):
    cfg = S.ScenesConfig(out=tmp_path / "o", flavour="fashion", n_train=3, n_test=3)
    summary = S.run(cfg)
    assert summary["config"]["fashion_path"] == str(DEBIAN_FASHION)
    images, labels = S.load_fashion(DEBIAN_FASHION, "test")
    assert images.shape == (10_000, 28, 28) and np.bincount(labels).tolist() == [1000] * 10
    assets = S.Assets("fashion", images, [np.flatnonzero(labels == k) for k in range(10)])
    for scene, _rng in _scenes(cfg, 20):
        _tint_check(np.asarray(S.render(scene, cfg, assets)), scene)


# --------------------------------------------------------------------------- existing flavours


def _fingerprint(root: Path) -> str:
    """sha256 over every shard member in order: decoded pixels for images (independent of
    the PNG encoder's zlib), raw bytes for .txt and .json, the .json without its last field
    `regions` (generator 1.2 appended it; the bytes before it are 1.0's, which the
    fingerprints pin)."""
    h = hashlib.sha256()
    for shard in sorted(root.rglob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                data = tar.extractfile(m).read()
                if m.name.endswith(".png"):
                    data = np.asarray(Image.open(io.BytesIO(data))).tobytes()
                if m.name.endswith(".json"):
                    meta = json.loads(data)
                    assert list(meta)[-1] == "regions", m.name
                    del meta["regions"]
                    data = json.dumps(meta, ensure_ascii=False).encode("utf-8")  # as make_sample writes it
                h.update(f"{shard.parent.name}/{m.name}:{len(data)}:".encode())
                h.update(data)
    return h.hexdigest()


def test_shapes_and_fashion_samples_are_unchanged(tmp_path):
    """The samples (pixels, captions, metadata) of the two older flavours are those that
    generator 1.0 (commit ba9d25a) wrote: eval numbers on them stay comparable."""
    S.run(S.ScenesConfig(out=tmp_path / "s", n_train=24, n_test=16, shard_size=10, seed=5))
    fake = _fake_fashion(tmp_path / "fmnist")
    S.run(S.ScenesConfig(out=tmp_path / "f", flavour="fashion", fashion_path=fake, n_train=12, n_test=12,
                         shard_size=10, seed=5))
    assert _fingerprint(tmp_path / "s") == "6319e040aaa2486d85ee306183118030a550152b74639e2ad8dce11c430cf724"
    assert _fingerprint(tmp_path / "f") == "9e8351f7e15302fd001743ae3fa2886befe91fef0ce8a2deda42a22a54d925ad"


# --------------------------------------------------------------------------- cluttered


def _no_debian_fashion(monkeypatch, tmp_path):
    """Make Debian's Fashion-MNIST look absent, whatever this machine has installed."""
    monkeypatch.setattr(scenes_assets, "DEFAULT_FASHION_DIRS", (str(tmp_path / "no-fashion-here"),))


@pytest.fixture
def cluttered_cfg(tmp_path):
    """A cluttered config that mixes shapes with (fake) Fashion-MNIST items."""
    return S.ScenesConfig(out=tmp_path / "o", flavour="cluttered", fashion_path=_fake_fashion(tmp_path / "fmnist"))


@pytest.mark.parametrize("flavour", S.FLAVOURS)
def test_captions_true_and_negatives_false_in_every_flavour(flavour, tmp_path):
    fake = _fake_fashion(tmp_path / "fmnist")
    cfg = S.ScenesConfig(flavour=flavour, fashion_path=None if flavour == "shapes" else fake)
    kinds_seen = {k: 0 for k in S.NEGATIVE_KINDS}
    for scene, rng in _scenes(cfg, 120):
        for caption in S.captions(scene, rng, 5):
            assert S.scene_satisfies(scene, caption), (caption, scene)
        for kind, negs in S.hard_negatives(scene, rng, 3).items():
            kinds_seen[kind] += len(negs)
            for caption in negs:
                assert not S.scene_satisfies(scene, caption), (kind, caption, scene)
    assert all(n > 50 for n in kinds_seen.values()), kinds_seen


def test_cluttered_run_is_deterministic(cluttered_cfg, tmp_path):
    def cfg(out):
        return S.ScenesConfig(out=tmp_path / out, flavour="cluttered", fashion_path=cluttered_cfg.fashion_path,
                              n_train=12, n_test=9, shard_size=5, seed=3, clip_benchmark=True)

    S.run(cfg("a"))
    S.run(cfg("b"))
    files = _all_files(tmp_path / "a")
    assert files == _all_files(tmp_path / "b")
    assert {"train/00002.tar", "test/00001.tar", "clip_benchmark/test/1.tar"} <= set(files)
    meta = json.loads(_tar_members(tmp_path / "a" / "test" / "00000.tar")["000000000.json"])
    scene = S.make_scene(np.random.default_rng(meta["seed"]), cfg("a"), S.load_assets(cfg("a"), "test"))
    assert [o["bbox"] for o in meta["objects"]] == [list(o.bbox) for o in scene.objects]  # meta replays the scene


def test_cluttered_objects_count_occlusion_and_mix(cluttered_cfg):
    counts, kinds, visible = set(), set(), []
    for scene, _rng in _scenes(cluttered_cfg, 150):
        objs = scene.objects
        counts.add(len(objs))
        assert len({(o.colour, o.shape) for o in objs}) == len(objs)  # "colour noun" names one object
        for o in objs:
            kinds.add("fashion" if o.shape in S.FASHION_ITEMS else "shape")
            w = scene.outline_px
            assert w <= o.bbox[0] and o.bbox[2] + w <= 64 and w <= o.bbox[1] and o.bbox[3] + w <= 64
            visible.append(o.visible)
        for i in range(len(objs)):
            for j in range(i + 1, len(objs)):
                assert S._pair_relations(scene, i, j), "every pair is clearly related, overlapping or not"
    assert counts == {2, 3, 4, 5, 6}
    assert kinds == {"fashion", "shape"}
    assert min(visible) >= S.MIN_VISIBLE  # the occlusion bound
    assert sum(v < 0.95 for v in visible) > 0.1 * len(visible)  # and occlusion does happen
    narrow = S.ScenesConfig(flavour="cluttered", fashion_path=cluttered_cfg.fashion_path, min_objects=3, max_objects=3)
    assert {len(scene.objects) for scene, _ in _scenes(narrow, 20)} == {3}


def test_recorded_visibility_matches_the_drawing(cluttered_cfg):
    """Recompute each object's visible share in floats from the layers as drawn (later
    footprints multiply the earlier ink by 1 - alpha) and compare with the record."""
    assets = S.load_assets(cluttered_cfg, "test")
    checked = 0
    for scene, _rng in _scenes(cluttered_cfg, 40, assets=assets):
        w = scene.outline_px
        ink = np.zeros((len(scene.objects), 64, 64))
        for k, obj in enumerate(scene.objects):
            x0, y0, x1, y1 = obj.bbox
            alpha = S._object_layers(obj, assets)[0] / 255
            foot = np.zeros((64, 64))
            foot[y0 - w : y1 + w, x0 - w : x1 + w] = S._dilate((alpha * 255).astype(np.int32), w) / 255
            ink[:k] *= 1 - foot
            ink[k, y0:y1, x0:x1] = alpha
        for k, obj in enumerate(scene.objects):
            x0, y0, x1, y1 = obj.bbox
            full = S._object_layers(obj, assets)[0].sum() / 255
            assert ink[k].sum() / full == pytest.approx(obj.visible, abs=0.01), obj
            checked += obj.visible < 1
    assert checked > 5


def test_cluttered_distractors_are_drawn_but_never_named(cluttered_cfg):
    with_distractors = 0
    for scene, rng in _scenes(cluttered_cfg, 150):
        named = [o for o in scene.objects if not o.distractor]
        assert named, "at least one object is named"
        caps = S.captions(scene, rng, 6)
        for d in (o for o in scene.objects if o.distractor):
            with_distractors += 1
            assert not any(f"{d.colour} {d.shape}" in c for c in caps), (d, caps)
            assert not any(re.match(r"[a-z]+ objects?:", c) for c in caps)  # a count would have to list it
        mentioned = [o for o in scene.objects if any(f"{o.colour} {o.shape}" in c for c in caps)]
        assert mentioned == named  # the fullest caption names every object that is not a distractor
    assert with_distractors > 50


def test_verifier_sees_distractors_and_occlusion():
    circle = S.SceneObject("circle", "red", "small", (4, 20, 17, 33))
    square = S.SceneObject("square", "blue", "large", (36, 2, 58, 24))
    star = S.SceneObject("star", "red", "small", (40, 40, 53, 53), distractor=True)
    scene = S.Scene([circle, square, star], 64, "cluttered", (0, 0, 0), None, 8.0)
    # True of the distractor, so never a valid hard negative.
    assert S.scene_satisfies(scene, "a red star below a blue square")
    assert not S.scene_satisfies(scene, "two objects: a red circle and a blue square")  # the count counts it
    assert S.scene_satisfies(scene, "three objects: a red circle, a blue square and a red star")
    for kind, negs in S.hard_negatives(scene, np.random.default_rng(0), 5).items():
        assert negs and not any("star" in n for n in negs) or kind != "replace_object", negs  # the star is not absent
        assert not any(S.scene_satisfies(scene, n) for n in negs)
    # An object hidden beyond the bound is no evidence for a caption.
    hidden = S.Scene([circle, S.SceneObject("square", "blue", "large", (36, 2, 58, 24), visible=0.5)], 64,
                     "cluttered", (0, 0, 0), None, 8.0)
    assert not S.scene_satisfies(hidden, "a red circle left of a blue square")
    assert S.scene_satisfies(hidden, "a red circle")
    with pytest.raises(AssertionError, match="recognisable"):
        S.hard_negatives(hidden, np.random.default_rng(0))


def test_cluttered_backgrounds_split_train_and_test(cluttered_cfg, tmp_path):
    cfg = S.ScenesConfig(out=tmp_path / "bg", flavour="cluttered", fashion_path=cluttered_cfg.fashion_path,
                         n_train=60, n_test=60, shard_size=60)
    summary = S.run(cfg)
    regions = summary["cluttered"]["backgrounds"]["regions"]
    assert sorted(regions) == sorted(S.BACKGROUND_PHOTOS)
    for photo, r in regions.items():
        assert r["train"][2] <= r["test"][0], photo  # train columns end where test columns begin
    photos_seen = {"train": set(), "test": set()}
    for split in ("train", "test"):
        for name, data in _tar_members(tmp_path / "bg" / split / "00000.tar").items():
            if name.endswith(".json"):
                bg = json.loads(data)["background"]
                rx0, ry0, rx1, ry1 = regions[bg["photo"]][split]
                x0, y0, x1, y1 = bg["crop"]
                assert rx0 <= x0 < x1 <= rx1 and ry0 <= y0 < y1 <= ry1, (split, bg)
                photos_seen[split].add(bg["photo"])
    assert len(photos_seen["train"]) >= 8 and len(photos_seen["test"]) >= 8
    # And the photos themselves: real textures, not flat fields.
    for name, photo in S.load_photos().items():
        assert photo.std() > 10, name


@pytest.mark.parametrize("size", [64, 128])
def test_cluttered_objects_stand_out_from_the_background(size, cluttered_cfg):
    """Legibility: the outline's luma is far from the background around the object, and
    the fill's colour is far (CIELAB distance) from that background's mean colour."""
    from skimage.color import rgb2lab

    cfg = S.ScenesConfig(flavour="cluttered", fashion_path=cluttered_cfg.fashion_path, image_size=size)
    assets = S.load_assets(cfg, "test")
    worst_outline, worst_fill = 1.0, 1000.0
    for scene, _rng in _scenes(cfg, 40, assets=assets):
        bg = S._photo_background(assets.photos[scene.photo], scene.crop, size)
        luma, lab = S._luma(bg), rgb2lab(bg.astype(np.uint8))
        w = scene.outline_px
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.bbox
            near = np.zeros((size, size), bool)
            near[max(0, y0 - 3 * w) : y1 + 3 * w, max(0, x0 - 3 * w) : x1 + 3 * w] = True
            near[y0 - w : y1 + w, x0 - w : x1 + w] = False  # the ring just outside the footprint's box
            outline = 0 if obj.outline == "black" else 255
            worst_outline = min(worst_outline, abs(outline - luma[near].mean()) / 255)
            fill = rgb2lab(np.array([[S.COLOURS[obj.colour]]], np.uint8))[0, 0]
            worst_fill = min(worst_fill, float(np.linalg.norm(lab[near].mean(0) - fill)))
    assert worst_outline > 0.3, worst_outline
    assert worst_fill > 20, worst_fill


def test_cluttered_without_fashion_mnist_falls_back_to_shapes(tmp_path, monkeypatch):
    _no_debian_fashion(monkeypatch, tmp_path)
    summary = S.run(S.ScenesConfig(out=tmp_path / "o", flavour="cluttered", n_train=4, n_test=4))
    assert summary["config"]["fashion_path"] is None and summary["cluttered"]["fashion_mnist"] is None
    assert summary["cluttered"]["objects"].startswith("shapes only")
    assert summary["vocabulary"]["shapes"] == list(S.SHAPES)
    manifest = json.loads((tmp_path / "o" / "scenes.json").read_text())
    assert manifest["cluttered"]["objects"].startswith("shapes only")
    for name, data in _tar_members(tmp_path / "o" / "test" / "00000.tar").items():
        if name.endswith(".json"):
            assert all(o["shape"] in S.SHAPES for o in json.loads(data)["objects"])
    # A folder given explicitly must hold Fashion-MNIST: no silent fallback then.
    with pytest.raises(UserError) as err:
        S.ScenesConfig(flavour="cluttered", fashion_path=tmp_path / "missing").validate()
    assert err.value.where == "--fashion-path"


def test_cluttered_sample_metadata(cluttered_cfg, tmp_path):
    cfg = S.ScenesConfig(out=tmp_path / "m", flavour="cluttered", fashion_path=cluttered_cfg.fashion_path,
                         n_train=0, n_test=20, shard_size=20, image_size=96)
    summary = S.run(cfg)
    stats = summary["stats"]["test"]
    assert stats["visible"]["min"] >= S.MIN_VISIBLE and stats["visible"]["occluded"] > 0
    assert sum(stats["distractors_per_image"].values()) == 20
    members = _tar_members(tmp_path / "m" / "test" / "00000.tar")
    for k in range(20):
        meta = json.loads(members[f"{k:09d}.json"])
        assert members[f"{k:09d}.txt"].decode() == meta["captions"][0]
        assert meta["flavour"] == "cluttered" and meta["outline_px"] == 2  # 96 px
        assert Image.open(io.BytesIO(members[f"{k:09d}.png"])).size == (96, 96)
        for o in meta["objects"]:
            assert set(o) == {"shape", "colour", "size", "bbox", "visible", "distractor", "outline"}
            assert o["outline"] in S.OUTLINES and S.MIN_VISIBLE <= o["visible"] <= 1


# --------------------------------------------------------------------------- CLIP_benchmark copy


def _clip_benchmark_pairs(root: Path) -> list[tuple[str, bytes, list[str]]]:
    """(key, image bytes, captions) as CLIP_benchmark's build_wds_dataset reads a retrieval
    dataset: dataset_type.txt says "retrieval", test/nshards.txt counts the shards
    {0..n-1}.tar, and each sample's .txt holds its captions, split with str.splitlines."""
    wds = pytest.importorskip("webdataset")
    assert (root / "dataset_type.txt").read_text().strip().lower() == "retrieval"
    nshards = int((root / "test" / "nshards.txt").read_text())
    pattern = str(root / "test" / ("{0..%d}.tar" % (nshards - 1)))
    rows = wds.WebDataset(pattern, shardshuffle=False).to_tuple("__key__", "webp;png;jpg;jpeg", "txt")
    return [(key, image, text.decode("utf-8").splitlines()) for key, image, text in rows]


def test_clip_benchmark_copy_matches_our_reader(cluttered_cfg, tmp_path):
    from hierdctl.sources import Sample, open_source

    out = tmp_path / "cb"
    for flavour in ("shapes", "cluttered"):
        S.run(S.ScenesConfig(out=out, flavour=flavour, n_train=3, n_test=13, shard_size=4, captions_per_image=5,
                             clip_benchmark=True, fashion_path=None if flavour == "shapes" else cluttered_cfg.fashion_path))
        theirs = _clip_benchmark_pairs(out / "clip_benchmark")
        source = open_source(str(out / "test"))
        ours = [(s.key, s.image, s.captions) for u in source.units for s in source.iter_unit(u) if isinstance(s, Sample)]
        assert len(ours) == len(theirs) == 13
        assert theirs == ours
        for key, _image, caps in theirs:  # every caption of every test image, as in KEY.json
            assert len(caps) == 5
    manifest = json.loads((out / "scenes.json").read_text())
    assert manifest["clip_benchmark"]["shards"] == 4
    assert "--dataset_root OUT/clip_benchmark " in manifest["clip_benchmark"]["command"]  # files name no path
    assert "--num_workers 4 " in manifest["clip_benchmark"]["command"]
    summary = S.run(S.ScenesConfig(out=out, n_train=3, n_test=5, clip_benchmark=True))
    assert f"--dataset_root {out / 'clip_benchmark'} " in summary["clip_benchmark"]["command"]
    # One shard: CLIP_benchmark's default of 4 workers would leave 3 without data (webdataset then
    # stops the run); the command asks for no more workers than there are shards.
    assert summary["clip_benchmark"]["shards"] == 1 and "--num_workers 1 " in summary["clip_benchmark"]["command"]
    assert S.clip_benchmark_command("OUT/clip benchmark", 2).count("'OUT/clip benchmark'") == 1  # quoted for the shell
    # Regenerating without the copy removes it: it would describe a test split that is gone.
    S.run(S.ScenesConfig(out=out, n_train=3, n_test=5))
    assert not (out / "clip_benchmark").exists()


def test_run_refuses_a_folder_whose_scenes_json_another_tool_wrote(tmp_path):
    out = tmp_path / "data"
    (out / "train").mkdir(parents=True)
    (out / "scenes.json").write_text('{"name": "someone else\'s dataset"}')
    (out / "train" / "00007.tar").write_bytes(b"the user's shard")
    with pytest.raises(UserError, match="holds no scenes.json of hierdctl scenes"):
        S.run(S.ScenesConfig(out=out, n_train=4, n_test=4, shard_size=4))
    assert (out / "train" / "00007.tar").read_bytes() == b"the user's shard"
    # its own earlier output is regenerated as before
    mine = tmp_path / "mine"
    S.run(S.ScenesConfig(out=mine, n_train=4, n_test=4, shard_size=4))
    S.run(S.ScenesConfig(out=mine, n_train=4, n_test=4, shard_size=4))


# --------------------------------------------------------------------------- regions (eval-grounding)


@pytest.mark.parametrize("flavour", S.FLAVOURS)
def test_every_sample_of_both_splits_carries_a_region_per_object(flavour, tmp_path):
    fake = _fake_fashion(tmp_path / "fmnist")
    out = tmp_path / "o"
    summary = S.run(S.ScenesConfig(out=out, flavour=flavour, n_train=12, n_test=12, shard_size=6,
                                   fashion_path=None if flavour == "shapes" else fake))
    kinds = Counter()
    for split in ("train", "test"):
        assert summary["stats"][split]["regions"]["attribute"] == sum(
            len(json.loads(d)["objects"]) for shard in sorted((out / split).glob("*.tar"))
            for n, d in _tar_members(shard).items() if n.endswith(".json"))
        for shard in sorted((out / split).glob("*.tar")):
            for name, data in _tar_members(shard).items():
                if not name.endswith(".json"):
                    continue
                meta = json.loads(data)
                objs, regions = meta["objects"], meta["regions"]
                nouns = Counter(o["shape"] for o in objs)
                attribute = [r for r in regions if r["kind"] == "attribute"]
                bare = [r for r in regions if r["kind"] == "object"]
                assert len(attribute) == len(objs) and len(attribute) + len(bare) == len(regions)
                assert [r["object"] for r in bare] == [k for k, o in enumerate(objs) if nouns[o["shape"]] == 1]
                for r in regions:
                    o = objs[r["object"]]
                    assert set(r) == {"phrase", "bbox", "kind", "size", "object"}
                    assert r["bbox"] == o["bbox"] and r["size"] == o["size"] in S.SIZES
                    size, colour, noun = S._parse_np(r["phrase"])  # the captions' grammar
                    assert noun == o["shape"]
                    assert (size, colour) == ((o["size"], o["colour"]) if r["kind"] == "attribute" else (None, None))
                    # The phrase names exactly its object, so one box is the right answer.
                    named = [k for k, p in enumerate(objs) if p["shape"] == noun
                             and colour in (None, p["colour"]) and size in (None, p["size"])]
                    assert named == [r["object"]], (r, objs)
                for r in attribute:  # the first caption names every named object with this phrase
                    assert (r["phrase"] in meta["captions"][0]) != objs[r["object"]].get("distractor", False), r
                kinds.update(r["kind"] for r in regions)
    assert kinds["attribute"] > 0 and kinds["object"] > 0
    assert json.loads((out / "scenes.json").read_text())["region_kinds"] == ["attribute", "object"]


def test_a_folder_written_before_regions_is_regenerated_by_the_same_run(tmp_path):
    """Generator 1.1 wrote no regions: the same run over such a folder rewrites it with them."""
    out = tmp_path / "o"
    cfg = S.ScenesConfig(out=out, n_train=4, n_test=4, shard_size=4)
    S.run(cfg)
    for shard in (out / "train" / "00000.tar", out / "test" / "00000.tar"):  # make it look like 1.1's output
        members = [(n, json.dumps({k: v for k, v in json.loads(d).items() if k != "regions"}).encode()
                    if n.endswith(".json") else d) for n, d in _tar_members(shard).items()]
        S.write_tar_atomic(shard, members)
    manifest = json.loads((out / "scenes.json").read_text())
    (out / "scenes.json").write_text(json.dumps(manifest | {"version": "1.1"}))
    assert all("regions" not in json.loads(d) for n, d in _tar_members(out / "test" / "00000.tar").items()
               if n.endswith(".json"))
    S.run(cfg)
    assert json.loads((out / "scenes.json").read_text())["version"] == S.GENERATOR_VERSION == "1.2"
    for split in ("train", "test"):
        metas = [json.loads(d) for n, d in _tar_members(out / split / "00000.tar").items() if n.endswith(".json")]
        assert len(metas) == 4 and all(m["regions"] for m in metas)

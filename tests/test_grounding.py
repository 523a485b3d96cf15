"""eval-grounding: the original-pixel -> patch mapping (hand-computed, and against the real
transforms), the metrics on a model stub whose answers are known, an independent per-region
reference on a real tiny open_clip model, Scenes end to end, skips and bad input."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import open_clip
from conftest import TINY_CFG, make_tiny_model, save_local_dir, write_tar
from hierdctl import grounding as G
from hierdctl.stages import scenes as S
from hierdctl.errors import UserError
from hierdctl.specs import _pil_eval_transform
from hierdctl.stages import eval_grounding as EG
from hierdctl.configs import EvalGroundingConfig
from hierdctl.stages.eval_grounding import run

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _png(w: int, h: int, box=None) -> bytes:
    """A black w×h image, white inside `box` (x0, y0, x1, y1)."""
    a = np.zeros((h, w, 3), np.uint8)
    if box is not None:
        x0, y0, x1, y1 = box
        a[y0:y1, x0:x1] = 255
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------------
# Geometry: hand-computed
# ----------------------------------------------------------------------------------


def test_centre_crop_mapping_is_exact():
    """open_clip's eval transform at 224 on a 640×480 image: Resize(224) makes it int(224·640/480)
    = 298 × 224, CenterCrop(224) starts at round((298 − 224)/2) = 37."""
    plan, text = G.geometry_plan(open_clip.image_transform(224, is_train=False))
    assert text == "resize the shorter side to 224, centre crop 224×224"
    g = plan(640, 480)
    assert (g.sx, g.sy, g.ox, g.oy, g.out_w, g.out_h) == (298 / 640, 224 / 480, 37.0, 0.0, 224, 224)
    box = np.array([[100, 50, 300, 250]])
    u0, v0, u1, v1 = g.map_boxes(box)[0]
    assert (u0, u1) == pytest.approx((100 * 298 / 640 - 37, 300 * 298 / 640 - 37))  # 9.5625, 102.6875
    assert (v0, v1) == pytest.approx((50 * 224 / 480, 250 * 224 / 480))  # 23.33, 116.67
    c = G.cover(box, g, G.PatchGrid(14, 14, 16.0, 16.0))
    area, centre = c.area.reshape(14, 14), c.centre.reshape(14, 14)
    # Patch centres 8 + 16k inside [9.5625, 102.6875) × [23.33, 116.67): columns 1..5, rows 1..6.
    want = np.zeros((14, 14), bool)
    want[1:7, 1:6] = True
    assert (centre == want).all()
    assert area[1, 0] == pytest.approx((16 - 9.5625) / 16 * (32 - 50 * 224 / 480) / 16)
    assert area[3, 3] == 1.0 and area[0, 3] == 0.0 and area[7, 6] == pytest.approx((116 + 2 / 3 - 112) / 16 * (102.6875 - 96) / 16)
    assert area.sum() * 256 == pytest.approx((u1 - u0) * (v1 - v0))  # the patches tile the input
    assert c.share[0] == pytest.approx((u1 - u0) * (v1 - v0) / 224**2) and c.inside[0] and not c.clipped[0]


def test_resize_only_mapping_is_exact():
    """resize_mode 'squash': Resize((224, 224)), no crop: x scales by 224/640, y by 224/480."""
    plan, text = G.geometry_plan(open_clip.image_transform(224, is_train=False, resize_mode="squash"))
    assert "resize only" in text
    g = plan(640, 480)
    assert (g.sx, g.sy, g.ox, g.oy, g.out_w, g.out_h) == (0.35, 224 / 480, 0.0, 0.0, 224, 224)
    assert g.map_boxes(np.array([[100, 50, 300, 250]]))[0] == pytest.approx([35, 50 * 224 / 480, 105, 250 * 224 / 480])
    # Nothing is cut away: a box in the corner that a centre crop would lose stays.
    c = G.cover(np.array([[0, 0, 40, 40]]), g, G.PatchGrid(14, 14, 16.0, 16.0))
    assert c.inside[0] and c.area.reshape(14, 14)[0, 0] == pytest.approx(14 / 16 * 1.0)


def test_hf_transform_rounding_is_its_own():
    """hierdctl's hf: transform rounds the resized side (round(78·0.64) = 50), torchvision floors it
    (49): the centre crop then starts at 9, not round(8.5) = 8."""
    hf, _ = G.geometry_plan(_pil_eval_transform(32, 32, MEAN, STD))
    oc, _ = G.geometry_plan(open_clip.image_transform(32, is_train=False))
    a, b = hf(78, 50), oc(78, 50)
    assert (a.sx, a.ox, a.out_w) == (50 / 78, 9.0, 32) and (b.sx, b.ox, b.out_w) == (49 / 78, 8.0, 32)


def test_a_box_cut_away_by_the_crop_is_marked():
    g = G.geometry_plan(open_clip.image_transform(32, is_train=False))[0](64, 32)  # keeps x in [16, 48)
    c = G.cover(np.array([[0, 0, 10, 10], [10, 0, 20, 10], [20, 0, 30, 10]]), g, G.PatchGrid(4, 4, 8.0, 8.0))
    assert c.inside.tolist() == [False, True, True] and c.clipped.tolist() == [True, True, False]
    assert c.area[0].sum() == 0 and c.share[1] == pytest.approx(4 * 10 / 1024)


@pytest.mark.parametrize("kind", ["shortest", "squash", "longest", "hf"])
@pytest.mark.parametrize("size", [(640, 480), (74, 50), (50, 74), (31, 17), (78, 50)])
def test_mapping_matches_the_real_transform(kind, size):
    """A white box drawn in the original lands where the mapping says, through the real transform
    (to within the one pixel that interpolation blurs at each edge)."""
    w, h = size
    box = (w // 4, h // 3, w // 4 + max(3, w // 3), h // 3 + max(3, h // 3))
    tf = (_pil_eval_transform(32, 32, MEAN, STD) if kind == "hf"
          else open_clip.image_transform(32, is_train=False, resize_mode=kind))
    x = tf(Image.open(io.BytesIO(_png(w, h, box))).convert("RGB"))  # (3,32,32), normalised
    lit = (x * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1))[0].numpy() > 0.5
    g = G.geometry_plan(tf)[0](w, h)
    assert (g.out_h, g.out_w) == lit.shape
    u0, v0, u1, v1 = g.map_boxes(np.array([box]))[0]
    ys, xs = np.nonzero(lit)
    assert len(xs)
    assert abs(xs.min() - u0) <= 1 and abs(xs.max() + 1 - u1) <= 1, (xs.min(), xs.max() + 1, u0, u1)
    assert abs(ys.min() - v0) <= 1 and abs(ys.max() + 1 - v1) <= 1, (ys.min(), ys.max() + 1, v0, v1)


def test_an_unknown_preprocessing_step_is_unsupported():
    from torchvision import transforms as T

    with pytest.raises(G.Unsupported, match="RandomResizedCrop"):
        G.geometry_plan(T.Compose([T.RandomResizedCrop(32), T.ToTensor()]))


def test_score_is_one_bmm_and_equals_the_dot_products():
    tok = torch.nn.functional.normalize(torch.randn(3, 5, 8), dim=-1)
    phr = torch.nn.functional.normalize(torch.randn(3, 2, 8), dim=-1)
    assert torch.allclose(G.score(tok, phr), torch.einsum("brd,bgd->brg", phr, tok), atol=1e-6)


def test_region_scores_by_hand():
    sims = np.array([[0.1, 0.9, -0.5, 0.2], [-0.1, -0.2, -0.3, -0.4]])  # (R=2, G=4)
    area = np.array([[0.0, 1.0, 0.5, 0.0], [1.0, 0.0, 0.0, 0.0]])
    centre = np.array([[False, True, True, False], [True, False, False, False]])
    r = G.region_scores(sims, area, centre)
    assert r["hit"].tolist() == [True, True]  # region 1: argmax is patch 0 (every similarity negative)
    assert r["mass"][0] == pytest.approx(0.9 / 1.2) and r["mass"][1] == 0.0  # -0.5 counts as 0, not -0.25
    assert r["positive"].tolist() == [True, False]


def test_read_regions_keeps_the_well_formed():
    regions, bad = G.read_regions({"regions": [
        {"phrase": " a  red circle ", "bbox": [1, 2, 3, 4], "kind": "attribute", "size": "small"},
        {"phrase": "", "bbox": [1, 2, 3, 4]}, {"phrase": "x", "bbox": [3, 2, 1, 4]}, {"phrase": "x", "bbox": [1, 2, 3]},
        {"phrase": "x", "bbox": [1, 2, float("nan"), 4]}, {"phrase": "x", "bbox": [True, 2, 3, 4]}, "not a dict",
        {"phrase": "a dog", "bbox": [0, 0, 100.5, 40], "kind": 3}]})
    assert bad == 6
    assert regions == [G.Region("a red circle", (1, 2, 3, 4), "attribute", "small"), G.Region("a dog", (0, 0, 100.5, 40))]
    assert G.read_regions({"captions": ["x"]}) == (None, 0)
    assert [G.size_bucket(G.Region("x", (0, 0, w, 1))) for w in (1023, 1024, 9215, 9216)] == ["small", "medium", "medium", "large"]


# ----------------------------------------------------------------------------------
# The metrics on a model whose answers are known
# ----------------------------------------------------------------------------------


class OneHotEncoder:
    """A model stub on a 4×4 patch grid of a 32 px input (open_clip's own eval transform): patch
    g's token is the one-hot e_g (D = 16); a phrase's text embedding is the normalised sum of
    the one-hots listed for it in `phrases`."""

    backend = "stub"

    def __init__(self, phrases: dict[str, list[int]], patches: bool = True):
        self.spec = type("Spec", (), {"raw": "stub:one-hot"})()
        self.model, self.device, self.image_size, self.embed_dim = None, "cpu", 32, 16
        self.patch_grid = (4, 4) if patches else None
        self.eval_transform = open_clip.image_transform(32, is_train=False)
        self.names = list(phrases)
        self.table = torch.zeros(len(phrases), 16)
        for i, cells in enumerate(phrases.values()):
            self.table[i, cells] = 1.0
        self.table = torch.nn.functional.normalize(self.table, dim=-1)

    def describe(self):
        return {"spec": self.spec.raw, "backend": "stub", "patch_grid": list(self.patch_grid or []) or None}

    def tokenize(self, texts):
        return torch.tensor([[self.names.index(t)] for t in texts])

    def encode_text(self, tokens, want_tokens=False):
        return self.table[tokens[:, 0]], None

    def encode_image(self, x, want_patches=False):
        B = x.shape[0]
        return torch.ones(B, 16) / 4, (torch.eye(16).expand(B, 16, 16).clone() if want_patches else None)


def _stub(monkeypatch, encoders: dict):
    monkeypatch.setattr(EG, "load_encoder", lambda spec, device, where: encoders[spec])


def test_one_object_with_known_tokens_scores_pointing_1_and_mass_1(tmp_path, monkeypatch):
    """A 64×48 image: Resize(32) makes it 42×32 (int(32·64/48)), the crop starts at x = 5, so
    x_model = x·42/64 − 5 and y_model = y·2/3. The object covers patches (rows 1–2, columns 1–2)
    = model pixels [8, 24)², i.e. original x in [13, 29)·64/42, y in [12, 36): hand-computed."""
    box = [13 * 64 / 42, 12.0, 29 * 64 / 42, 36.0]
    inside = [5, 6, 9, 10]  # row-major patch indices of rows 1-2, columns 1-2
    enc = OneHotEncoder({"the object": inside, "elsewhere": [15], "cut away": [0]})
    regions = [{"phrase": "the object", "bbox": box, "kind": "right"},
               {"phrase": "elsewhere", "bbox": box, "kind": "wrong"},  # the model looks at patch 15: a miss
               {"phrase": "cut away", "bbox": [0, 10, 6, 20]},  # x < 5·64/42 = 7.6 is cropped away
               {"phrase": "", "bbox": box}]  # malformed
    write_tar(tmp_path / "00000.tar", [
        {"key": "a", "png": _png(64, 48, (20, 12, 44, 36)), "txt": "an object", "json": {"regions": regions}},
        {"key": "b", "png": _png(64, 48), "txt": "no regions here", "json": {}},
        {"key": "c", "png": b"not an image", "txt": "broken", "json": {"regions": regions}}])
    _stub(monkeypatch, {"open_clip:ViT-B-32": enc})
    r = run(EvalGroundingConfig(source=str(tmp_path / "00000.tar"), models=["open_clip:ViT-B-32"], quiet=True,
                                out=tmp_path / "report.json"))
    m = r["models"][0]
    assert m["metrics"]["pointing_acc/kind:right"] == 1.0
    assert m["metrics"]["box_mass/kind:right"] == pytest.approx(1.0, abs=1e-9)
    assert m["metrics"]["pointing_acc/kind:wrong"] == 0.0 and m["metrics"]["box_mass/kind:wrong"] == 0.0
    assert m["metrics"]["pointing_acc/all"] == 0.5 and m["metrics"]["box_mass/all"] == pytest.approx(0.5)
    assert m["metrics"]["pointing_acc_chance/all"] == 4 / 16
    # The control query is the image's mean phrase: 0.25 on the four object patches, 0.5 on patch
    # 15 (before normalising): it points at patch 15 (a miss) and puts 1/1.5 of its mass inside.
    assert m["metrics"]["pointing_acc_control/all"] == 0.0
    assert m["metrics"]["box_mass_control/all"] == pytest.approx(1 / 1.5)
    assert m["metrics"]["box_mass_chance/all"] == pytest.approx(16 * 16 / 32**2)
    assert m["regions"]["scored"] == 2 and m["regions"]["skipped"] == {"box_outside_crop": 1}
    assert r["counts"] == {"images": 1, "regions": 3, "regions_malformed": 2, "skipped_total": 2,
                           "skipped": {"corrupt_image": 1, "no_regions": 1}}
    assert json.loads((tmp_path / "report.json").read_text())["models"][0]["metrics"] == m["metrics"]
    assert r["schema"] == "hierdctl.eval-grounding/1" and m["geometry"]["patch_grid"] == [4, 4]


def test_a_model_without_patch_tokens_is_skipped_with_one_line(tmp_path, monkeypatch):
    box = [13 * 64 / 42, 12.0, 29 * 64 / 42, 36.0]
    write_tar(tmp_path / "00000.tar", [{"key": "a", "png": _png(64, 48), "txt": "x",
                                        "json": {"regions": [{"phrase": "the object", "bbox": box}]}}])
    good, flat = OneHotEncoder({"the object": [5, 6, 9, 10]}), OneHotEncoder({"the object": [0]}, patches=False)
    _stub(monkeypatch, {"open_clip:ViT-B-32": good, "open_clip:RN50": flat})
    r = run(EvalGroundingConfig(source=str(tmp_path / "00000.tar"), models=["open_clip:ViT-B-32"],
                                teacher="open_clip:RN50", quiet=True))
    teacher, model = r["models"]
    assert teacher["role"] == "teacher" and teacher["metrics"] == {} and "no patch tokens" in teacher["skipped"]
    assert r["notes"] == [f"open_clip:RN50: skipped: {teacher['skipped']}"] and "\n" not in r["notes"][0]
    assert model["metrics"]["pointing_acc/all"] == 1.0 and r["reference"] == "open_clip:ViT-B-32"
    with pytest.raises(UserError, match="no model could be evaluated") as e:
        run(EvalGroundingConfig(source=str(tmp_path / "00000.tar"), models=["open_clip:RN50"], quiet=True))
    assert e.value.where == "--model"


def test_a_source_without_regions_is_one_error_naming_it(tmp_path, tiny_teacher):
    write_tar(tmp_path / "00000.tar", [{"key": "a", "png": _png(8, 8), "txt": "x", "json": {}}])
    with pytest.raises(UserError, match=r"no sample .* carries usable regions .*no_regions: 1.*rerun hierdctl scenes") as e:
        run(EvalGroundingConfig(source=str(tmp_path / "00000.tar"), models=[tiny_teacher], quiet=True))
    assert e.value.where == "SOURCE"


@pytest.mark.parametrize("change, flag", [
    ({"models": []}, "--model"), ({"models": ["nope"]}, "--model"), ({"teacher": "open_clip:x.json"}, "--teacher"),
    ({"batch_size": 0}, "--batch-size"), ({"workers": -1}, "--workers"), ({"max_pixels": 0}, "--max-pixels"),
    ({"out": "."}, "--out")])
def test_bad_config_names_the_flag(change, flag):
    cfg = EvalGroundingConfig(**({"source": "x", "models": ["open_clip:ViT-T-16"]} | change))
    with pytest.raises(UserError) as e:
        cfg.validate()
    assert e.value.where == flag


# ----------------------------------------------------------------------------------
# A real tiny open_clip model: an independent reference, and Scenes end to end
# ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scenes_test(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scenes")
    S.run(S.ScenesConfig(out=out, n_train=0, n_test=24, shard_size=10, seed=3))
    return out / "test"


def _reference(model, pre, tok, samples: list[tuple[bytes, dict]]) -> list[tuple[bool, float, bool, float]]:
    """(hit, box mass, control hit, control box mass) per region, computed without
    hierdctl/grounding.py: open_clip's own forward with output_tokens (ln_post applied),
    tokens @ proj, per-patch loops, and 64 px square images that Resize(32) halves (no crop)."""
    phrases = sorted({r["phrase"] for _, meta in samples for r in meta["regions"]})
    model.visual.output_tokens = True
    with torch.no_grad():
        text = dict(zip(phrases, model.encode_text(tok(phrases), normalize=True)))
    out = []
    for png, meta in samples:
        img = Image.open(io.BytesIO(png)).convert("RGB")
        assert img.size == (64, 64)
        with torch.no_grad():
            _, tokens = model.visual(pre(img)[None])
            tokens = torch.nn.functional.normalize(tokens[0] @ model.visual.proj, dim=-1)  # (16,D)
        mean = torch.stack([text[r["phrase"]] for r in meta["regions"]]).mean(0)
        mean = mean / mean.norm()

        def hit_and_mass(query, box):
            s = (tokens @ query).tolist()
            x0, y0, x1, y1 = (v / 2 for v in box)
            best = max(range(16), key=lambda g: (s[g], -g))
            cx, cy = (best % 4) * 8 + 4, (best // 4) * 8 + 4
            num = den = 0.0
            for g in range(16):
                px, py = (g % 4) * 8, (g // 4) * 8
                a = max(0.0, min(x1, px + 8) - max(x0, px)) * max(0.0, min(y1, py + 8) - max(y0, py)) / 64
                num, den = num + a * max(s[g], 0.0), den + max(s[g], 0.0)
            return x0 <= cx < x1 and y0 <= cy < y1, num / den if den > 0 else 0.0

        for r in meta["regions"]:
            out.append(hit_and_mass(text[r["phrase"]], r["bbox"]) + hit_and_mass(mean, r["bbox"]))
    return out


def _samples(shard_dir: Path) -> list[tuple[bytes, dict]]:
    import tarfile

    out = []
    for shard in sorted(shard_dir.glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name in sorted(n for n in members if n.endswith(".json")):
            out.append((members[name.replace(".json", ".png")], json.loads(members[name])))
    return out


def test_scenes_end_to_end_matches_an_independent_reference(scenes_test, tiny_teacher, tmp_path, monkeypatch):
    model_dir = Path(tiny_teacher.split(":", 1)[1])
    calls = []
    real_score = G.score
    monkeypatch.setattr(EG.grounding, "score", lambda t, p: calls.append(t.shape[0]) or real_score(t, p))
    r = run(EvalGroundingConfig(source=str(scenes_test), models=[tiny_teacher], teacher=tiny_teacher, batch_size=10,
                                workers=2, quiet=True, out=tmp_path / "g.json"))
    samples = _samples(scenes_test)
    regions = [reg for _, meta in samples for reg in meta["regions"]]
    assert calls == [10, 10, 4, 10, 10, 4]  # one batched matmul per batch, per model (shards of 10)
    assert r["counts"] == {"images": 24, "regions": len(regions), "regions_malformed": 0, "skipped": {},
                           "skipped_total": 0}
    teacher, model = r["models"]
    assert teacher["metrics"] == model["metrics"] and set(model["retention"].values()) == {100.0}
    assert not any("_chance" in k or "_control" in k for k in model["retention"])
    model, _, pre = open_clip.create_model_and_transforms(f"local-dir:{model_dir}")
    tok = open_clip.get_tokenizer(f"local-dir:{model_dir}")
    ref = _reference(model.eval(), pre, tok, samples)
    m = teacher["metrics"]
    for j, name in enumerate(("pointing_acc", "box_mass", "pointing_acc_control", "box_mass_control")):
        assert m[f"{name}/all"] == pytest.approx(np.mean([x[j] for x in ref]), abs=1e-5), name
    assert m["box_mass/all"] != m["box_mass_control/all"]  # the control is another query
    kinds = [reg["kind"] for reg in regions]
    for kind in ("attribute", "object"):
        assert teacher["regions"]["by_group"][f"kind:{kind}"] == kinds.count(kind)
        sel = [x[1] for x, k in zip(ref, kinds) if k == kind]
        assert m[f"box_mass/kind:{kind}"] == pytest.approx(np.mean(sel), abs=1e-5)
    for size in ("small", "large"):
        share = [(x1 - x0) * (y1 - y0) / 64**2 for reg in regions if reg["size"] == size
                 for x0, y0, x1, y1 in [reg["bbox"]]]
        assert m[f"box_mass_chance/size:{size}"] == pytest.approx(np.mean(share), abs=1e-6)
    assert set(m) == {f"{s}/{g}" for s in G.SCORE_NAMES
                      for g in ("all", "kind:attribute", "kind:object", "size:small", "size:large")}
    assert teacher["geometry"] == {"preprocessing": "resize the shorter side to 32, centre crop 32×32",
                                   "input": [32, 32], "patch_grid": [4, 4], "patch_px": [8.0, 8.0]}
    assert json.loads((tmp_path / "g.json").read_text())["task"] == "grounding"


def test_a_vit_without_exposed_patch_tokens_is_skipped(scenes_test, tiny_teacher, tmp_path):
    """A real open_clip ViT with attentional pooling (CoCa's tower): its encoder exposes no patch grid."""
    cfg = copy.deepcopy(TINY_CFG)
    cfg["vision_cfg"].update(attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=2)
    d = save_local_dir(make_tiny_model(cfg), cfg, tmp_path / "attn-pool")
    r = run(EvalGroundingConfig(source=str(scenes_test), models=[f"local-dir:{d}", tiny_teacher], quiet=True))
    assert "no patch tokens" in r["models"][0]["skipped"] and r["models"][1]["metrics"]
    assert len(r["notes"]) == 1 and r["reference"] == tiny_teacher


def test_an_hf_model_is_scored_like_its_open_clip_twin(scenes_test, tiny_teacher, tmp_path):
    """transformers' CLIPModel exposes its patch tokens (post_layernorm, visual_projection): the same
    weights as hf: and as local-dir: give the same numbers on square Scenes images."""
    pytest.importorskip("transformers")
    from hierdctl import hf_export

    model_dir = Path(tiny_teacher.split(":", 1)[1])
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{model_dir}")
    hf_export.write_hf(model, TINY_CFG, {"size": 32}, tmp_path / "hf")
    r = run(EvalGroundingConfig(source=str(scenes_test), models=[tiny_teacher, f"hf:{tmp_path / 'hf'}"], quiet=True))
    oc, hf = r["models"]
    assert hf["model"]["backend"] == "hf" and "skipped" not in hf
    assert hf["geometry"]["preprocessing"] == "resize the shorter side to 32 (rounded), centre crop 32×32"
    assert hf["metrics"].keys() == oc["metrics"].keys()
    for k, v in oc["metrics"].items():
        assert hf["metrics"][k] == pytest.approx(v, abs=1e-4), k


def test_the_cli_prints_the_table_or_the_json_and_one_line_for_bad_input(scenes_test, tiny_teacher, tmp_path):
    from typer.testing import CliRunner

    from hierdctl.cli import app

    def cli(*args):
        return CliRunner().invoke(app, ["eval-grounding", *map(str, args)])

    r = cli(scenes_test, "--model", tiny_teacher, "--json", "--quiet", "--out", tmp_path / "g.json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report == json.loads((tmp_path / "g.json").read_text())
    assert report["models"][0]["metrics"]["pointing_acc/all"] >= 0
    r = cli(scenes_test, "--model", tiny_teacher, "--quiet", "--batch-size", "7")
    assert r.exit_code == 0 and "pointing_acc/all" in r.output and "box_mass_chance/all" in r.output, r.output
    for bad, flag in ((["--model", "nope:x"], "--model"), (["--model", tiny_teacher, "--batch-size", "0"],
                                                           "--batch-size"),
                      (["--model", tiny_teacher, "--teacher", "nope:x"], "--teacher")):
        r = cli(scenes_test, *bad)
        assert r.exit_code == 2 and flag in r.output and "Traceback" not in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1, r.output
    r = cli(tmp_path / "missing", "--model", tiny_teacher)
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output

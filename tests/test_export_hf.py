"""export --format hf: open_clip student -> transformers CLIPModel folder. Conversion and parity
(tiny model and ViT-T-16), the tokenizer against open_clip's, every non-mappable config refused
with one line naming its field, the parity check failing on broken conversions, and the stage
end to end on a real distill run."""

from __future__ import annotations

import dataclasses
import html
import io
import json
import shutil
from pathlib import Path

import ftfy
import pytest
import torch
from typer.testing import CliRunner

from conftest import CAPTIONS, TINY_CFG, image_bytes, make_shards, make_tiny_model
from hierdctl import hf_export as H
from hierdctl.cli import app
from hierdctl.errors import UserError
import open_clip
transformers = pytest.importorskip("transformers")
VIT_T16 = json.loads((Path(H.__file__).parent / "model_configs" / "ViT-T-16.json").read_text())


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _cfg(**changes) -> dict:
    """TINY_CFG with changes: {"vision_cfg": {...}} / {"text_cfg": {...}} merge into the towers."""
    cfg = json.loads(json.dumps(TINY_CFG))
    for k, v in changes.items():
        if k in ("vision_cfg", "text_cfg"):
            cfg[k].update(v)
        else:
            cfg[k] = v
    return cfg


def _export(cfg: dict, folder: Path, preprocess_cfg: dict | None = None, seed: int = 0):
    """A random-init open_clip model of `cfg`, written as a transformers folder; (model, tokenizer, preprocess)."""
    model = make_tiny_model(cfg, seed=seed).eval()  # open_clip.CLIP(**cfg): open_clip's defaults for the rest
    pp = {"size": model.visual.image_size} | (preprocess_cfg or {})
    tokenizer = open_clip.SimpleTokenizer(context_length=cfg["text_cfg"].get("context_length", 77))
    preprocess = open_clip.image_transform(model.visual.image_size, is_train=False,
                                           **{k: pp[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in pp})
    H.write_hf(model, cfg, pp, folder)
    return model, tokenizer, preprocess


def _pil(i: int, size=(48, 40)):
    from PIL import Image

    return Image.open(io.BytesIO(image_bytes(i, size=size))).convert("RGB")


# ----------------------------------------------------------------------------------
# What maps
# ----------------------------------------------------------------------------------


def test_every_open_clip_config_field_is_mapped_or_refused():
    """open_clip 3.3's CLIP arguments and tower config fields, all classified (a new one fails here)."""
    import inspect

    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    assert {f.name for f in dataclasses.fields(CLIPVisionCfg)} == H.VISION_KEYS
    assert {f.name for f in dataclasses.fields(CLIPTextCfg)} == H.TEXT_KEYS
    clip_args = set(inspect.signature(open_clip.CLIP.__init__).parameters) - {"self", "cast_dtype"}
    assert clip_args | {"custom_text", "multimodal_cfg"} == H.TOP_KEYS  # the two open_clip's factory reads
    assert H.check_convertible(TINY_CFG) is None and H.check_convertible(VIT_T16, {}) is None


REFUSED = [  # (change to TINY_CFG, preprocess_cfg, the field the message must name)
    ({"vision_cfg": {"layers": [1, 1, 1, 1]}}, None, "vision_cfg.layers"),
    ({"vision_cfg": {"timm_model_name": "vit_tiny_patch16_224"}}, None, "vision_cfg.timm_model_name"),
    ({"vision_cfg": {"attentional_pool": True}}, None, "vision_cfg.attentional_pool"),
    ({"vision_cfg": {"pool_type": "avg"}}, None, "vision_cfg.pool_type"),
    ({"vision_cfg": {"no_ln_pre": True}}, None, "vision_cfg.no_ln_pre"),
    ({"vision_cfg": {"ls_init_value": 1e-5}}, None, "vision_cfg.ls_init_value"),
    ({"vision_cfg": {"block_type": "custom"}}, None, "vision_cfg.block_type"),
    ({"vision_cfg": {"qk_norm": True}}, None, "vision_cfg.qk_norm"),
    ({"vision_cfg": {"scaled_cosine_attn": True}}, None, "vision_cfg.scaled_cosine_attn"),
    ({"vision_cfg": {"scale_heads": True}}, None, "vision_cfg.scale_heads"),
    ({"vision_cfg": {"scale_attn_inner": True}}, None, "vision_cfg.scale_attn_inner"),
    ({"vision_cfg": {"scale_attn": True}}, None, "vision_cfg.scale_attn"),
    ({"vision_cfg": {"scale_fc": True}}, None, "vision_cfg.scale_fc"),
    ({"vision_cfg": {"act_kwargs": {"approximate": "sigmoid"}}}, None, "vision_cfg.act_kwargs"),
    ({"quick_gelu": True, "text_cfg": {"act_kwargs": {"approximate": "tanh"}}}, None, "text_cfg.act_kwargs"),
    ({"vision_cfg": {"norm_kwargs": {"elementwise_affine": False}}}, None, "vision_cfg.norm_kwargs"),
    ({"vision_cfg": {"image_size": [32, 48]}}, None, "vision_cfg.image_size"),
    ({"vision_cfg": {"patch_size": [8, 4]}}, None, "vision_cfg.patch_size"),
    ({"vision_cfg": {"width": 70, "head_width": 16}}, None, "vision_cfg.width"),
    ({"vision_cfg": {"patch_drop": 0.5}}, None, "vision_cfg.patch_drop"),  # a typo: not a field
    ({"text_cfg": {"hf_model_name": "bert-base-uncased"}}, None, "text_cfg.hf_model_name"),
    ({"text_cfg": {"hf_tokenizer_name": "bert-base-uncased"}}, None, "text_cfg.hf_tokenizer_name"),
    ({"text_cfg": {"tokenizer_mode": "clips"}}, None, "text_cfg.tokenizer_mode"),
    ({"text_cfg": {"tokenizer_kwargs": {"clean": "canonicalize"}}}, None, "text_cfg.tokenizer_kwargs"),
    ({"text_cfg": {"tokenizer_kwargs": {"reduction_mask": "simple"}}}, None, "text_cfg.tokenizer_kwargs"),
    ({"text_cfg": {"embed_cls": True}}, None, "text_cfg.embed_cls"),
    ({"text_cfg": {"no_causal_mask": True}}, None, "text_cfg.no_causal_mask"),
    ({"text_cfg": {"pool_type": "last"}}, None, "text_cfg.pool_type"),
    ({"text_cfg": {"pool_type": "eos"}}, None, "text_cfg.pool_type"),  # eos_id 2 (open_clip's default)
    ({"text_cfg": {"proj_bias": True}}, None, "text_cfg.proj_bias"),
    ({"text_cfg": {"proj_type": "none"}}, None, "text_cfg.proj_type"),
    ({"text_cfg": {"ls_init_value": 1e-5}}, None, "text_cfg.ls_init_value"),
    ({"text_cfg": {"qk_norm": True}}, None, "text_cfg.qk_norm"),
    ({"text_cfg": {"vocab_size": 1000}}, None, "text_cfg.vocab_size"),
    ({"text_cfg": {"width": 64, "heads": 3}}, None, "text_cfg.width"),
    ({"custom_text": True}, None, "model_cfg.custom_text"),
    ({"multimodal_cfg": {"width": 64}}, None, "model_cfg.multimodal_cfg"),
    ({"init_logit_bias": -10.0}, None, "model_cfg.init_logit_bias"),
    ({"embed_dims": 32}, None, "model_cfg.embed_dims"),
    ({}, {"resize_mode": "longest"}, "preprocess_cfg.resize_mode"),
    ({}, {"interpolation": "nearest"}, "preprocess_cfg.interpolation"),
]


@pytest.mark.parametrize("change,pp,field", REFUSED, ids=[f for _, _, f in REFUSED])
def test_non_mappable_configs_are_refused_with_one_line_naming_the_field(change, pp, field):
    reason = H.check_convertible(_cfg(**change), pp if pp is not None else {})
    assert reason is not None and reason.startswith(field) and "\n" not in reason, reason
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        H.to_hf_config(_cfg(**change), pp or {})


MAPPED = {  # configs away from the defaults that still map exactly (each claim of the module docstring)
    "quick_gelu+ctx32+eos+sincos+ln_after_pool": (
        _cfg(quick_gelu=True, nonscalar_logit_scale=True, init_logit_scale=1.5,
             vision_cfg={"final_ln_after_pool": True, "pos_embed_type": "sin_cos_2d", "mlp_ratio": 2.0,
                         "patch_dropout": 0.5, "patch_size": [8, 8], "image_size": [32, 32]},
             text_cfg={"context_length": 32, "pool_type": "eos", "eos_id": H.EOT, "final_ln_after_pool": True,
                       "mlp_ratio": 3.0, "vocab_size": 49410}),
        {}),
    "gelu_tanh+eps+squash+bilinear": (
        _cfg(vision_cfg={"act_kwargs": {"approximate": "tanh"}, "norm_kwargs": {"eps": 1e-6}, "head_width": 16},
             text_cfg={"act_kwargs": {"approximate": "tanh"}, "norm_kwargs": {"eps": 1e-6}, "heads": 4}),
        {"resize_mode": "squash", "interpolation": "bilinear", "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}),
}


@pytest.mark.parametrize("name", list(MAPPED))
def test_mappable_variants_convert_with_parity(name, tmp_path):
    cfg, pp = MAPPED[name]
    assert H.check_convertible(cfg, pp) is None
    model, tokenizer, preprocess = _export(cfg, tmp_path / "hf", pp)
    checks = H.check_parity(model, tmp_path / "hf", tokenizer, preprocess)
    assert checks["text"]["ids_match"] and checks["text"]["context_length"] == cfg["text_cfg"].get("context_length", 77)
    assert checks["image"]["max_abs_diff"] <= H.EMBED_ATOL and checks["text"]["max_abs_diff"] <= H.EMBED_ATOL
    assert checks["image_processor"]["max_levels"] <= H.PIXEL_ATOL_LEVELS
    config = transformers.CLIPConfig.from_pretrained(tmp_path / "hf")
    if "quick_gelu" in name:
        assert config.vision_config.hidden_act == config.text_config.hidden_act == "quick_gelu"
        assert config.vision_config.intermediate_size == 128 and config.text_config.intermediate_size == 192
    else:
        assert config.vision_config.hidden_act == "gelu_pytorch_tanh" and config.text_config.layer_norm_eps == 1e-6
        proc = transformers.CLIPImageProcessor.from_pretrained(tmp_path / "hf")
        assert proc.do_center_crop is False and proc.size["height"] == 32 and list(proc.image_std) == [0.25] * 3


# ----------------------------------------------------------------------------------
# Conversion and parity: the tiny model and ViT-T-16
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["tiny", pytest.param("ViT-T-16", marks=pytest.mark.slow)])
def test_conversion_parity_image_and_text(arch, tmp_path):
    cfg = TINY_CFG if arch == "tiny" else VIT_T16
    folder = tmp_path / "hf"
    model, tokenizer, preprocess = _export(cfg, folder)
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "merges.txt", "model.safetensors", "preprocessor_config.json", "processor_config.json",
        "tokenizer.json", "tokenizer_config.json", "vocab.json"]
    checks = H.check_parity(model, folder, tokenizer, preprocess)
    assert checks["image"]["max_abs_diff"] <= H.EMBED_ATOL and checks["text"]["max_abs_diff"] <= H.EMBED_ATOL
    assert checks["text"]["dynamic_padding_max_abs_diff"] <= H.EMBED_ATOL and checks["text"]["ids_match"]
    assert checks["image_processor"]["max_levels"] <= H.PIXEL_ATOL_LEVELS
    # Independently of check_parity: other images and captions, through the processor and the model's forward.
    hf = transformers.CLIPModel.from_pretrained(folder).eval()
    proc = transformers.CLIPProcessor.from_pretrained(folder, backend="pil")  # PIL's bicubic, as open_clip's transform
    images = [_pil(i, size=size) for i, size in enumerate([(60, 50), (100, 50), (40, 48)])]  # whole crop offsets at 32 and 224
    inputs = proc(text=CAPTIONS, images=images, padding=True, truncation=True, return_tensors="pt")
    pixels = torch.stack([preprocess(im) for im in images])
    torch.testing.assert_close(inputs["pixel_values"], pixels, atol=1e-6, rtol=0)
    with torch.no_grad():
        out = hf(**inputs)
        want_i = model.encode_image(pixels, normalize=True)
        want_t = model.encode_text(tokenizer(CAPTIONS), normalize=True)
    torch.testing.assert_close(out.image_embeds, want_i, atol=H.EMBED_ATOL, rtol=0)
    torch.testing.assert_close(out.text_embeds, want_t, atol=H.EMBED_ATOL, rtol=0)
    assert float(hf.logit_scale.detach()) == pytest.approx(float(model.logit_scale.detach()))
    c = hf.config
    assert (c.projection_dim, c.vision_config.image_size, c.text_config.max_position_embeddings) == (
        cfg["embed_dim"], cfg["vision_cfg"]["image_size"], cfg["text_cfg"]["context_length"])


_convert = H.convert_state_dict


def test_centre_crop_offsets_differ_by_one_pixel_on_half_offsets(tmp_path):
    """Documented difference: torchvision's CenterCrop (open_clip) rounds a half crop offset
    (Python round: to even), transformers floors it; 74x50 -> resized 47x32, offset 7.5: 8 vs 7."""
    _, _, preprocess = _export(TINY_CFG, tmp_path / "hf")
    proc = transformers.CLIPProcessor.from_pretrained(tmp_path / "hf", backend="pil")
    image = _pil(0, size=(74, 50))
    oc, hf = preprocess(image), proc(images=[image], return_tensors="pt")["pixel_values"][0]
    assert not torch.allclose(hf, oc, atol=1e-3)
    torch.testing.assert_close(hf[:, :, 1:], oc[:, :, :-1], atol=1e-6, rtol=0)  # hf starts one column left


def _swap_q_and_k(state):
    """A conversion bug: queries and keys exchanged in every layer (shapes still fit)."""
    out = _convert(state)
    for k in [k for k in out if ".q_proj." in k]:
        kk = k.replace(".q_proj.", ".k_proj.")
        out[k], out[kk] = out[kk], out[k]
    return out


def _edit_json(path: Path, edit) -> None:
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj))


BROKEN = {  # (how the folder is broken, the check that must catch it)
    "q and k swapped": ("image", None),
    "tokenizer context": ("CLIPTokenizer ids differ", lambda d: _edit_json(
        d / "tokenizer_config.json", lambda o: o.update(model_max_length=16))),
    "image mean": ("image_processor", lambda d: [_edit_json(
        d / f, lambda o: (o.get("image_processor", o)).update(image_mean=[0.4, 0.4, 0.4]))
        for f in ("processor_config.json", "preprocessor_config.json")]),
}


@pytest.mark.parametrize("broken", list(BROKEN))
def test_parity_check_catches_a_broken_folder(broken, tmp_path, monkeypatch):
    match, edit = BROKEN[broken]
    if edit is None:
        monkeypatch.setattr(H, "convert_state_dict", _swap_q_and_k)
    model, tokenizer, preprocess = _export(TINY_CFG, tmp_path / "hf")
    if edit is not None:
        edit(tmp_path / "hf")
    with pytest.raises(H.ParityError, match=match):
        H.check_parity(model, tmp_path / "hf", tokenizer, preprocess)


def test_convert_state_dict_accounts_for_every_tensor():
    model = make_tiny_model()
    state = model.state_dict()
    hf = H.convert_state_dict(state)
    assert set(hf) == set(transformers.CLIPModel(H.to_hf_config(TINY_CFG, {})[0]).state_dict())
    w = state["transformer.resblocks.1.attn.in_proj_weight"]  # (3W, W): q, k, v
    assert torch.equal(hf["text_model.encoder.layers.1.self_attn.v_proj.weight"], w[128:])
    assert torch.equal(hf["visual_projection.weight"], state["visual.proj"].t())
    with pytest.raises(ValueError, match="visual.attn_pool.query"):
        H.convert_state_dict(state | {"visual.attn_pool.query": torch.zeros(1)})


# ----------------------------------------------------------------------------------
# The tokenizer
# ----------------------------------------------------------------------------------


def test_vocabulary_is_open_clips():
    vocab, merges = H.clip_bpe()
    ref = open_clip.SimpleTokenizer()
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    assert vocab == {names.get(t, t): i for t, i in ref.encoder.items()}
    assert (vocab["<|startoftext|>"], vocab["<|endoftext|>"], vocab["!"], len(merges)) == (49406, 49407, 0, 48894)


@pytest.fixture(scope="module")
def hf_tokenizers(tmp_path_factory):
    out = {}
    for ctx in (77, 32):
        d = tmp_path_factory.mktemp(f"tok{ctx}")
        H.write_tokenizer(d, ctx).save_pretrained(d)
        out[ctx] = transformers.AutoTokenizer.from_pretrained(d)  # as a user loads it
    return out


VARIED = [
    "A DOG on a Skateboard", "don't stop: it's 3.14159, isn't it?", "two (2) cats & 1 dog!!", "wow! a dog!",
    "naïve café crème brûlée", "cafe\u0301 written decomposed", "ümlaut ÄÖÜ ß, Ελληνικά, 日本語のテキスト",
    "  leading, trailing   and\trepeated\nwhitespace  ", "non\u00a0breaking space", "emoji 🐶🐱 and #hashtags @home $100",
    "a-b_c/d e.g. x+y=z", "<|endoftext|> written as text", "x" * 300,
    " ".join(["a very long caption about a small cat on a red sofa"] * 12),
]


@pytest.mark.parametrize("ctx", [77, 32])
def test_tokenizer_ids_equal_open_clips(hf_tokenizers, ctx):
    tok, ref = hf_tokenizers[ctx], open_clip.SimpleTokenizer(context_length=ctx)
    assert tok.model_max_length == ctx and tok.pad_token_id == 0
    got = tok(VARIED, padding="max_length", truncation=True, return_tensors="pt")
    want = ref(VARIED)
    for i, text in enumerate(VARIED):
        assert got["input_ids"][i].tolist() == want[i].tolist(), text
    # Truncated: both keep [SOT, the first L-2 tokens, EOT]; the mask covers exactly the non-padding.
    assert got["input_ids"][-1, -1] == want[-1, -1] == H.EOT
    last = (want == H.EOT).int().argmax(1)  # the first EOT: where both models pool
    assert torch.equal(got["attention_mask"].sum(1), last + 1)


KNOWN_DIFFERENCES = [  # open_clip cleans text with ftfy.fix_text + html.unescape; CLIPTokenizer does not
    "the dog’s “ball”",  # typographic quotes (ftfy uncurls them)
    "fish &amp; chips",  # an HTML entity
    "cafÃ© au lait",  # mojibake (ftfy repairs it)
    "ﬁne ﬂowers",  # Latin ligatures
    "ＦＵＬＬ width",  # full-width letters
]


@pytest.mark.parametrize("text", KNOWN_DIFFERENCES)
def test_known_tokenizer_differences_vanish_after_open_clips_cleaning(hf_tokenizers, text):
    tok, ref = hf_tokenizers[77], open_clip.SimpleTokenizer()
    ids = lambda t: tok([t], padding="max_length", truncation=True, return_tensors="pt")["input_ids"][0].tolist()  # noqa: E731
    assert ids(text) != ref([text])[0].tolist()
    cleaned = html.unescape(html.unescape(ftfy.fix_text(text)))  # what docs/eval.md tells users to do
    assert ids(cleaned) == ref([text])[0].tolist()


# ----------------------------------------------------------------------------------
# The stage: hierdctl export RUN --format hf
# ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_teacher) -> Path:
    from hierdctl.stages import distill as S
    from hierdctl.stages.cache_teacher import CacheTeacherConfig
    from hierdctl.stages.cache_teacher import run as cache_run

    d = tmp_path_factory.mktemp("export_hf")
    src = make_shards(d / "data", n_shards=1, per_shard=8)
    cache_run(CacheTeacherConfig(source=src, out=d / "cache", teacher=tiny_teacher, views=1, clusters=2,
                                 max_phrases=2, workers=0, quiet=True))
    S.run(S.resolve_config(dict(cache=str(d / "cache"), student="tiny-test", recipe="clip-rd", steps=2, batch_size=8,
                                lr=1e-3, warmup=1, workers=0, quiet=True, log_every=1, seed=3, out=str(d / "run"))))
    return d / "run"


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory):
    """`hierdctl export RUN --out DIR --format hf`: (DIR, the CLI output)."""
    out = tmp_path_factory.mktemp("exported") / "model"
    r = _cli("export", run_dir, "--out", out, "--format", "hf", "--quiet")
    assert r.exit_code == 0, r.output
    return out, r.output


@pytest.mark.slow
def test_export_format_hf_end_to_end(exported):
    """One folder for both worlds, laid out as LAION's open_clip repos: open_clip's two files beside
    transformers' at the root; open_clip and transformers both load DIR itself."""
    out, output = exported
    assert "hf vs open_clip" in output and "tokenizer files" in output
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["formats"] == ["open_clip", "hf"] and manifest["layout"] == 2
    assert sorted(p.name for p in out.iterdir()) == sorted(manifest["files"]) == [
        "README.md", "config.json", "export.json", "merges.txt", "model.safetensors", "open_clip_config.json",
        "open_clip_model.safetensors", "preprocessor_config.json", "processor_config.json", "tokenizer.json",
        "tokenizer_config.json", "vocab.json"]
    hf_checks = manifest["checks"]["hf"]
    assert hf_checks["image"]["max_abs_diff"] <= hf_checks["image"]["atol"] == H.EMBED_ATOL
    assert hf_checks["text"]["ids_match"] and hf_checks["text"]["max_abs_diff"] <= H.EMBED_ATOL
    assert hf_checks["image_processor"]["max_levels"] <= H.PIXEL_ATOL_LEVELS
    assert "model.safetensors" in hf_checks["files"] and hf_checks["folder"] == "."
    assert manifest["checks"]["tokenizer"]["ids_match"]
    card = (out / "README.md").read_text()
    assert "CLIPModel.from_pretrained('model')" in card and "SentenceTransformer('model')" in card
    assert "normalize_embeddings=True" in card and "tags:\n- clip" in card and "- transformers" in card
    # transformers loads DIR and gives the open_clip local dir's embeddings (the same DIR).
    oc, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    oc_tok = open_clip.get_tokenizer(f"local-dir:{out}")
    hf = transformers.CLIPModel.from_pretrained(out).eval()
    proc = transformers.CLIPProcessor.from_pretrained(out)
    images = [_pil(i) for i in range(3)]
    pixels = torch.stack([preprocess(im) for im in images])
    inputs = proc(text=CAPTIONS[:3], padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out_hf = hf(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], pixel_values=pixels)
        want_i, want_t = oc.eval().encode_image(pixels, normalize=True), oc.encode_text(oc_tok(CAPTIONS[:3]), normalize=True)
    torch.testing.assert_close(out_hf.image_embeds, want_i, atol=H.EMBED_ATOL, rtol=0)
    torch.testing.assert_close(out_hf.text_embeds, want_t, atol=H.EMBED_ATOL, rtol=0)


@pytest.mark.slow
def test_hierdctl_hf_spec_reads_the_export_and_exports_of_the_first_layout(exported, tmp_path):
    """eval-retrieval --model hf:DIR: hierdctl's own transformers loader, on the exported folder; an
    export of layout 1 (the transformers files in DIR/hf, no "layout" in export.json) reads as before."""
    from hierdctl.specs import load_encoder, parse_spec

    out, _ = exported
    old = tmp_path / "old"
    shutil.copytree(out, old)
    manifest = json.loads((old / "export.json").read_text())
    (old / "hf").mkdir()
    for name in manifest["checks"]["hf"]["files"]:
        (old / name).rename(old / "hf" / name)
    del manifest["layout"]
    (old / "export.json").write_text(json.dumps(manifest))
    assert parse_spec(f"hf:{old}").path == str(old / "hf") and parse_spec(f"hf:{old / 'hf'}").path == str(old / "hf")
    assert parse_spec(f"hf:{out}").path == str(out)
    oc, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    want_t = oc.eval().encode_text(open_clip.get_tokenizer(f"local-dir:{out}")(CAPTIONS), normalize=True)
    for spec in (f"hf:{out}", f"hf:{old}", f"local-dir:{old}"):
        enc = load_encoder(spec)
        pixels = torch.stack([enc.eval_transform(_pil(i)) for i in range(3)])
        torch.testing.assert_close(pixels, torch.stack([preprocess(_pil(i)) for i in range(3)]), atol=1e-6, rtol=0)
        with torch.no_grad():
            torch.testing.assert_close(enc.encode_image(pixels)[0], oc.encode_image(pixels, normalize=True),
                                       atol=H.EMBED_ATOL, rtol=0)
            torch.testing.assert_close(enc.encode_text(enc.tokenize(CAPTIONS))[0], want_t, atol=H.EMBED_ATOL, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("args", [["--format", "open_clip,onnx,hf"], ["-f", "onnx", "--format", "hf"]],
                         ids=["comma-list", "repeated"])
def test_formats_combine_and_none_is_dropped(run_dir, tmp_path, args):
    out = tmp_path / "model"
    r = _cli("export", run_dir, "--out", out, *args, "--quiet")
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["formats"] == ["open_clip", "onnx", "hf"]
    names = {p.name for p in out.iterdir()}
    assert {"open_clip_model.safetensors", "model.safetensors", "image_encoder.onnx", "text_encoder.onnx",
            "tokenizer.json"} <= names and not (out / "hf").exists()
    assert set(manifest["checks"]) == {"open_clip", "onnx", "hf", "tokenizer"}


@pytest.mark.slow
def test_a_failed_hf_parity_check_exits_1_and_publishes_nothing(run_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(H, "convert_state_dict", _swap_q_and_k)
    r = _cli("export", run_dir, "--out", tmp_path / "model", "--format", "hf")
    assert r.exit_code == 1 and "export check failed" in r.output and "transformers CLIPModel" in r.output, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_refused_student_exits_2_with_one_line_before_any_work(run_dir, tmp_path, monkeypatch):
    from hierdctl.stages import export as E

    # The run's last checkpoint, declared with average pooling: the same weights, a non-mappable config.
    ck = run_dir / "checkpoints" / "step-0000002.safetensors"
    lone = tmp_path / "ck" / "step-0000002.safetensors"
    lone.parent.mkdir()
    shutil.copy(ck, lone)
    meta = json.loads(ck.with_suffix(".json").read_text())
    meta["model_cfg"]["vision_cfg"]["pool_type"] = "avg"
    lone.with_suffix(".json").write_text(json.dumps(meta))
    monkeypatch.setattr(E, "reference_model", lambda *a, **k: pytest.fail("work started"))
    r = _cli("export", lone, "--out", tmp_path / "model", "--format", "hf")
    assert r.exit_code == 2 and r.output.count("\n") <= 2, r.output
    assert "--format" in r.output and "vision_cfg.pool_type='avg'" in r.output
    assert not (tmp_path / "model").exists()


def test_format_hf_without_transformers_is_a_user_error_and_all_excludes_hf(tmp_path, monkeypatch):
    import importlib.util

    from hierdctl.stages.export import ExportConfig

    assert ExportConfig(source=tmp_path, out=tmp_path / "o", format="all").formats == ("open_clip", "onnx")
    assert ExportConfig(source=tmp_path, out=tmp_path / "o", format="hf").formats == ("open_clip", "hf")
    for given in ("hf,onnx", ["onnx", "hf"], "open_clip,onnx,hf", ["all,hf"], "onnx,hf,onnx"):
        assert ExportConfig(source=tmp_path, out=tmp_path / "o", format=given).formats == ("open_clip", "onnx", "hf")
    assert ExportConfig(source=tmp_path, out=tmp_path / "o", format="onnx").formats == ("onnx",)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else real(name, *a))
    r = _cli("export", tmp_path, "--out", tmp_path / "o", "--format", "hf")
    assert r.exit_code == 2 and "--format" in r.output and "hierdctl[hf]" in r.output, r.output
    assert r.output.count("\n") <= 2 and not (tmp_path / "o").exists()
    ExportConfig(source=tmp_path, out=tmp_path / "o", format="open_clip").validate()  # open_clip needs none
    with pytest.raises(UserError, match="transformers"):  # onnx's tokenizer files are transformers'
        ExportConfig(source=tmp_path, out=tmp_path / "o", format="all").validate()

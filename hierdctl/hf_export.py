"""An open_clip CLIP student -> a Hugging Face transformers `CLIPModel` folder, and its parity check.

The files (`export --format hf` writes them at DIR's root, beside open_clip's
open_clip_config.json + open_clip_model.safetensors, as LAION's open_clip repositories are laid
out; exports of layout 1 had them in DIR/hf):

    config.json, model.safetensors      transformers.CLIPModel (CLIPModel.save_pretrained), float32
    vocab.json, merges.txt              OpenAI's CLIP BPE, built from open_clip's bpe_simple_vocab_16e6.txt.gz
    tokenizer.json, tokenizer_config.json   CLIPTokenizer: model_max_length = the student's context length,
                                        pad token '!' (id 0, open_clip's padding), split_special_tokens
    processor_config.json               CLIPProcessor (image processor + tokenizer)
    preprocessor_config.json            CLIPImageProcessor alone (transformers 4.x, sentence-transformers)

What maps. open_clip's `CLIP` with its own VisionTransformer (class-token pooling, pre- and
post-LayerNorm, fused-qkv nn.MultiheadAttention blocks, GELU or QuickGELU MLPs) and its causal
text transformer pooled at the end-of-text token is, layer for layer, transformers' CLIP.
Anything else is refused by `check_convertible` with one line naming the field: timm and
ModifiedResNet vision towers, attentional pooling, pool types other than the class token /
end-of-text token, no_ln_pre, layer scale, custom attention blocks (qk_norm, scaled cosine
attention, head/attention/MLP scales), activations other than GELU/QuickGELU, LayerNorm
options other than eps, text projection bias or none, CustomTextCLIP / Hugging Face text
towers, CoCa, SigLIP's logit bias, non-square images or patches, tokenizers other than
open_clip's default CLIP BPE, and letterbox ("longest") preprocessing. Every field of open_clip
3.3's CLIPVisionCfg / CLIPTextCfg is in VISION_KEYS / TEXT_KEYS (mapped or refusable): a test
fails when open_clip grows one this module does not know.

Parity (`check_parity`), before the folder is published: the folder is loaded back with
`CLIPModel.from_pretrained` and `CLIPProcessor.from_pretrained` and compared with the open_clip
student on (a) image embeddings of the same pixel tensors, (b) text embeddings of probe captions
each library tokenises itself (the token ids must be equal), (c) the processor's pixels vs
open_clip's eval transform on decoded PIL images. Tolerances: EMBED_ATOL on L2-normalised
embeddings (float32; the two use different attention kernels), PIXEL_ATOL_LEVELS on pixels.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

SOT, EOT = 49406, 49407  # '<|startoftext|>', '<|endoftext|>' in CLIP's BPE vocabulary
VOCAB_SIZE = 49408
PAD_TOKEN = "!"  # id 0: open_clip pads with 0

# L2-normalised embeddings, transformers vs open_clip on the same inputs (float32). Observed on
# CPU: image ≤ 1.5e-7 and text 0 for the tiny test model and ViT-T-16 (random init, 224 px);
# 1e-5 leaves room for other CPUs, GPUs and attention kernels, and is still far below what any
# conversion mistake gives (a swapped q/k or transposed projection: > 1e-2).
EMBED_ATOL = 1e-5
# Pixels, CLIPProcessor vs open_clip's eval transform, in grey levels of 255 (denormalised, so the
# tolerance does not depend on the std). With transformers' PIL backend both run PIL's bicubic
# resize: identical (0). transformers 5 loads its torchvision backend by default, which resizes
# uint8 tensors with torch's bicubic kernel and rounds differently from PIL: 1 level on the probe
# images at every size from 32 to 384, 2 on images with other scale factors (320x240 -> 224).
# 4 levels (≈ 0.06 after normalisation) leaves room for other CPUs' kernels; a real bug
# (wrong mean/std, size, interpolation or channel order) moves pixels by tens of levels.
PIXEL_ATOL_LEVELS = 4.0

# ----------------------------------------------------------------------------------
# What maps and what does not
# ----------------------------------------------------------------------------------

TOP_KEYS = frozenset({"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale", "init_logit_bias",
                      "nonscalar_logit_scale", "output_dict", "custom_text", "multimodal_cfg"})
# Every field of open_clip's CLIPVisionCfg. Mapped: layers, width, head_width, mlp_ratio, patch_size,
# image_size, act_kwargs, norm_kwargs; no effect on the eval embedding: patch_dropout (training only),
# output_tokens, pos_embed_type (sin_cos_2d is stored as weights like learnable ones),
# final_ln_after_pool (LayerNorm is per token: after or before taking the class token is the same),
# attn_pooler_* and timm_* other than timm_model_name (only read with attentional_pool / a timm tower);
# refused unless at their defaults: the rest.
VISION_KEYS = frozenset({
    "layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size", "ls_init_value", "patch_dropout",
    "attentional_pool", "attn_pooler_queries", "attn_pooler_heads", "no_ln_pre", "pos_embed_type",
    "final_ln_after_pool", "pool_type", "output_tokens", "act_kwargs", "norm_kwargs", "block_type", "qk_norm",
    "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc", "timm_model_name",
    "timm_model_pretrained", "timm_pool", "timm_proj", "timm_proj_bias", "timm_drop", "timm_drop_path"})
# Every field of open_clip's CLIPTextCfg. Mapped: context_length, vocab_size, width, heads, layers,
# mlp_ratio, pool_type (argmax, or eos with eos_id 49407), proj_type (linear), act_kwargs,
# norm_kwargs; no effect: pad_id (only used with embed_cls), eos_id (only with pool_type eos),
# final_ln_after_pool (CLIP.encode_text ignores it; per-token LayerNorm anyway), output_tokens,
# hf_model_pretrained / hf_proj_type / hf_pooler_type (only with hf_model_name); refused: the rest.
TEXT_KEYS = frozenset({
    "context_length", "vocab_size", "hf_tokenizer_name", "tokenizer_mode", "tokenizer_kwargs", "width", "heads",
    "layers", "mlp_ratio", "ls_init_value", "embed_cls", "pad_id", "eos_id", "no_causal_mask", "final_ln_after_pool",
    "pool_type", "proj_bias", "proj_type", "output_tokens", "act_kwargs", "norm_kwargs", "block_type", "qk_norm",
    "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc", "hf_model_name",
    "hf_model_pretrained", "hf_proj_type", "hf_pooler_type"})

_CUSTOM_BLOCK = {  # open_clip's CustomResidualAttentionBlock options: CLIPEncoderLayer has none of them
    "qk_norm": "LayerNorm on queries and keys", "scaled_cosine_attn": "scaled cosine attention",
    "scale_heads": "per-head attention scales", "scale_attn_inner": "LayerNorm inside attention",
    "scale_attn": "LayerNorm after attention", "scale_fc": "LayerNorm inside the MLP"}
_REFUSED_IF_SET = {  # tower key -> what it is (refused when truthy)
    "ls_init_value": "layer scale: CLIP encoder layers have none",
    "attentional_pool": "attention pooler (CoCa-style): CLIPVisionModel pools the class token",
    "no_ln_pre": "no LayerNorm before the transformer: CLIPVisionModel always has pre_layrnorm",
    "timm_model_name": "a timm vision tower, not open_clip's VisionTransformer",
    "embed_cls": "CoCa's appended class token: CLIPTextModel has none",
    "no_causal_mask": "bidirectional text attention: CLIPTextModel is causal",
    "proj_bias": "a text projection with bias: CLIPModel's text_projection has none",
    "hf_tokenizer_name": "a Hugging Face tokenizer: the exported tokenizer is CLIP's BPE",
    "tokenizer_mode": "a Hugging Face tokenizer mode: the exported tokenizer is CLIP's BPE",
} | {k: f"{v} (custom attention block): CLIPEncoderLayer has none" for k, v in _CUSTOM_BLOCK.items()}


def _square(x) -> int | None:
    """An int for an int or a [n, n] pair; None for a non-square pair."""
    if isinstance(x, (list, tuple)):
        return int(x[0]) if len(x) == 2 and x[0] == x[1] else None
    return int(x)


def _hidden_act(tower: dict, quick_gelu: bool) -> str | None:
    """transformers' hidden_act for open_clip's activation (QuickGELU, or nn.GELU(**act_kwargs)); None: no match."""
    kw = dict(tower.get("act_kwargs") or {})
    if quick_gelu:
        return "quick_gelu" if not kw else None  # x * sigmoid(1.702 x) in both
    approximate = kw.pop("approximate", "none")
    return None if kw else {"none": "gelu", "tanh": "gelu_pytorch_tanh"}.get(approximate)


def _ln_eps(tower: dict) -> float | None:
    kw = dict(tower.get("norm_kwargs") or {})
    eps = kw.pop("eps", 1e-5)  # nn.LayerNorm's default, open_clip's and transformers' CLIP's
    return None if kw else float(eps)


def _tower_reason(name: str, t: dict, keys: frozenset, quick_gelu: bool) -> str | None:
    for k in t:
        if k not in keys:
            return f"{name}.{k}: not a field of open_clip's {'CLIPVisionCfg' if name == 'vision_cfg' else 'CLIPTextCfg'}"
    for k, what in _REFUSED_IF_SET.items():
        if t.get(k):
            return f"{name}.{k}={t[k]!r}: {what}"
    if t.get("block_type") not in (None, "default"):
        return f"{name}.block_type={t['block_type']!r}: a custom attention block; CLIPEncoderLayer is the default one"
    if _hidden_act(t, quick_gelu) is None:
        return (f"{name}.act_kwargs={t.get('act_kwargs')!r}" + (" with quick_gelu" if quick_gelu else "")
                + ": only GELU (exact or tanh) and QuickGELU map onto transformers' hidden_act")
    if _ln_eps(t) is None:
        return f"{name}.norm_kwargs={t['norm_kwargs']!r}: only eps maps (layer_norm_eps)"
    if not float(t.get("mlp_ratio", 4.0)) > 0:
        return f"{name}.mlp_ratio={t.get('mlp_ratio')!r}: must be positive"
    return None


def _vision_reason(v: dict, quick_gelu: bool) -> str | None:
    if isinstance(v.get("layers", 12), (list, tuple)):
        return f"vision_cfg.layers={v['layers']!r}: a list of stage depths is open_clip's ModifiedResNet, not a ViT"
    reason = _tower_reason("vision_cfg", v, VISION_KEYS, quick_gelu)
    if reason:
        return reason
    if v.get("pool_type", "tok") != "tok":
        return f"vision_cfg.pool_type={v['pool_type']!r}: CLIPVisionModel pools the class token ('tok')"
    if v.get("pos_embed_type", "learnable") not in ("learnable", "sin_cos_2d"):
        return f"vision_cfg.pos_embed_type={v['pos_embed_type']!r}: not an open_clip position embedding"
    for k, default in (("image_size", 224), ("patch_size", 16)):
        if _square(v.get(k, default)) is None:
            return f"vision_cfg.{k}={v[k]!r}: CLIPVisionModel needs a square {k.replace('_', ' ')}"
    width, head_width = int(v.get("width", 768)), int(v.get("head_width", 64))
    heads = width // head_width if head_width > 0 else 0
    if heads < 1 or width % heads:
        return f"vision_cfg.width={width} is not a multiple of its head count (width // head_width = {heads})"
    return None


def _text_reason(t: dict, quick_gelu: bool) -> str | None:
    if "hf_model_name" in t:  # open_clip builds CustomTextCLIP whenever the key is present
        return f"text_cfg.hf_model_name={t['hf_model_name']!r}: a Hugging Face text tower (CustomTextCLIP), not CLIP's"
    reason = _tower_reason("text_cfg", t, TEXT_KEYS, quick_gelu)
    if reason:
        return reason
    kw = t.get("tokenizer_kwargs") or {}
    defaults = {"clean": "lower", "reduction_mask": ""}  # SimpleTokenizer's
    if any(kw.get(k, d) != d for k, d in defaults.items()) or set(kw) - set(defaults):
        return (f"text_cfg.tokenizer_kwargs={kw!r}: only open_clip's default SimpleTokenizer "
                "(clean='lower', no reduction) maps onto CLIPTokenizer")
    pool = t.get("pool_type", "argmax")
    if not (pool == "argmax" or (pool == "eos" and t.get("eos_id", 2) == EOT)):
        return (f"text_cfg.pool_type={pool!r}" + (f" with eos_id={t.get('eos_id', 2)}" if pool == "eos" else "")
                + f": CLIPTextModel pools at the first end-of-text token (argmax, or eos with eos_id {EOT})")
    if t.get("proj_type", "linear") == "none":
        return "text_cfg.proj_type='none': CLIPModel always has a text_projection"
    if int(t.get("vocab_size", VOCAB_SIZE)) < VOCAB_SIZE:
        return f"text_cfg.vocab_size={t['vocab_size']}: smaller than CLIP's BPE vocabulary ({VOCAB_SIZE})"
    width, heads = int(t.get("width", 512)), int(t.get("heads", 8))
    if heads < 1 or width % heads:
        return f"text_cfg.width={width} is not a multiple of text_cfg.heads={heads}"
    return None


def _preprocess_reason(pp: dict) -> str | None:
    # preprocess_cfg.size needs no check: open_clip sets it to the vision tower's image_size.
    if pp.get("mode", "RGB") != "RGB":
        return f"preprocess_cfg.mode={pp['mode']!r}: CLIPImageProcessor converts to RGB"
    if pp.get("resize_mode", "shortest") not in ("shortest", "squash"):
        return (f"preprocess_cfg.resize_mode={pp['resize_mode']!r}: letterboxing has no CLIPImageProcessor "
                "counterpart (shortest edge + centre crop, or squash)")
    if pp.get("interpolation", "bicubic") not in ("bicubic", "bilinear", "random"):
        return f"preprocess_cfg.interpolation={pp['interpolation']!r}: not bicubic or bilinear"
    for k in ("mean", "std"):
        if k in pp and len(pp[k]) != 3:
            return f"preprocess_cfg.{k}={pp[k]!r}: needs 3 channels"
    return None


def check_convertible(model_cfg: dict, preprocess_cfg: dict | None = None) -> str | None:
    """None when an open_clip model config (and its preprocess_cfg) maps exactly onto transformers'
    CLIPModel and CLIPProcessor; else the reason, one line naming the field."""
    try:
        return _reason(model_cfg, preprocess_cfg)
    except (TypeError, ValueError, AttributeError, IndexError) as e:  # a hand-edited config: a number that is not one
        return f"model_cfg: malformed open_clip config ({type(e).__name__}: {(str(e).splitlines() or [''])[0]})"


def _reason(model_cfg: dict, preprocess_cfg: dict | None) -> str | None:
    if not isinstance(model_cfg, dict) or not isinstance(model_cfg.get("vision_cfg"), dict) \
            or not isinstance(model_cfg.get("text_cfg"), dict):
        return "model_cfg: not an open_clip CLIP config (vision_cfg and text_cfg objects)"
    if model_cfg.get("multimodal_cfg") is not None:
        return "model_cfg.multimodal_cfg: a CoCa model (captioning decoder), not a CLIP"
    if model_cfg.get("custom_text"):
        return "model_cfg.custom_text: open_clip's CustomTextCLIP, whose text tower is not CLIP's"
    if model_cfg.get("init_logit_bias") is not None:
        return "model_cfg.init_logit_bias: a SigLIP-style logit bias; CLIPModel has only logit_scale"
    for k in model_cfg:
        if k not in TOP_KEYS:
            return f"model_cfg.{k}: not an argument of open_clip's CLIP"
    if not isinstance(model_cfg.get("embed_dim"), int) or model_cfg["embed_dim"] < 1:
        return f"model_cfg.embed_dim={model_cfg.get('embed_dim')!r}: CLIPModel needs a projection width"
    quick = bool(model_cfg.get("quick_gelu", False))
    reason = _vision_reason(model_cfg["vision_cfg"], quick) or _text_reason(model_cfg["text_cfg"], quick)
    if reason or preprocess_cfg is None:
        return reason
    return _preprocess_reason(preprocess_cfg)


# ----------------------------------------------------------------------------------
# Config and weights
# ----------------------------------------------------------------------------------


def to_hf_config(model_cfg: dict, preprocess_cfg: dict):
    """(transformers.CLIPConfig, CLIPImageProcessor keyword arguments) for a convertible config."""
    import transformers

    reason = check_convertible(model_cfg, preprocess_cfg)
    if reason:
        raise ValueError(reason)
    v, t = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    quick = bool(model_cfg.get("quick_gelu", False))
    dim = int(model_cfg["embed_dim"])
    vw, tw = int(v.get("width", 768)), int(t.get("width", 512))
    size = _square(v.get("image_size", 224))
    vision = dict(hidden_size=vw, intermediate_size=int(vw * float(v.get("mlp_ratio", 4.0))), projection_dim=dim,
                  num_hidden_layers=int(v.get("layers", 12)), num_attention_heads=vw // int(v.get("head_width", 64)),
                  num_channels=3, image_size=size, patch_size=_square(v.get("patch_size", 16)),
                  hidden_act=_hidden_act(v, quick), layer_norm_eps=_ln_eps(v))
    text = dict(vocab_size=int(t.get("vocab_size", VOCAB_SIZE)), hidden_size=tw,
                intermediate_size=int(tw * float(t.get("mlp_ratio", 4.0))), projection_dim=dim,
                num_hidden_layers=int(t.get("layers", 12)), num_attention_heads=int(t.get("heads", 8)),
                max_position_embeddings=int(t.get("context_length", 77)), hidden_act=_hidden_act(t, quick),
                layer_norm_eps=_ln_eps(t), pad_token_id=0, bos_token_id=SOT, eos_token_id=EOT)
    # eos_token_id = 49407: CLIPTextModel pools at the first end-of-text token, which is where
    # open_clip's argmax pooling lands too (49407 is the largest id the tokenizer emits).
    scale = float(model_cfg.get("init_logit_scale", math.log(1 / 0.07)))  # the weights carry the trained one
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=dim,
                                     logit_scale_init_value=scale)
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    # PIL's BILINEAR (2) or BICUBIC (3); open_clip evaluates 'random' with bicubic.
    resample = 2 if preprocess_cfg.get("interpolation") == "bilinear" else 3
    squash = preprocess_cfg.get("resize_mode", "shortest") == "squash"
    processor = dict(do_resize=True, size={"height": size, "width": size} if squash else {"shortest_edge": size},
                     resample=resample, do_center_crop=not squash, crop_size={"height": size, "width": size},
                     do_rescale=True, rescale_factor=1 / 255, do_normalize=True, do_convert_rgb=True,
                     image_mean=[float(x) for x in preprocess_cfg.get("mean", OPENAI_DATASET_MEAN)],
                     image_std=[float(x) for x in preprocess_cfg.get("std", OPENAI_DATASET_STD)])
    return config, processor


_BLOCK = {  # open_clip ResidualAttentionBlock -> transformers CLIPEncoderLayer (besides attn.in_proj_*)
    "ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_FIXED = {  # open_clip CLIP key -> transformers CLIPModel key, copied as they are
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
} | {f"{a}.{p}": f"{b}.{p}" for a, b in (("visual.ln_pre", "vision_model.pre_layrnorm"),
                                         ("visual.ln_post", "vision_model.post_layernorm"),
                                         ("ln_final", "text_model.final_layer_norm")) for p in ("weight", "bias")}


def convert_state_dict(state: dict) -> dict:
    """open_clip CLIP state dict -> transformers CLIPModel state dict (new tensors, contiguous).

    The fused attention input projection in_proj_weight (3W, W) / in_proj_bias (3W) splits into
    q, k, v in that order; the projections visual.proj (W_v, D) and text_projection (W_t, D),
    applied as x @ proj, become Linear weights (D, W), i.e. transposed; logit_scale becomes a
    scalar (nonscalar_logit_scale stores it as (1,)). A key with no counterpart is an error."""
    import re

    out: dict = {}
    unmapped = []
    block = re.compile(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)")
    for k, x in state.items():
        m = block.fullmatch(k)
        if k in _FIXED:
            out[_FIXED[k]] = x
        elif k == "visual.proj":
            out["visual_projection.weight"] = x.t()
        elif k == "text_projection":
            out["text_projection.weight"] = x.t()
        elif k == "logit_scale":
            out["logit_scale"] = x.reshape(())
        elif m:
            tower = "vision_model" if m.group(1) else "text_model"
            prefix, rest = f"{tower}.encoder.layers.{m.group(2)}.", m.group(3)
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                assert x.shape[0] % 3 == 0, (k, tuple(x.shape))
                kind = rest.rsplit("_", 1)[1]  # weight | bias
                for name, part in zip(("q", "k", "v"), x.chunk(3, dim=0)):
                    out[f"{prefix}self_attn.{name}_proj.{kind}"] = part
            else:
                mod, _, param = rest.rpartition(".")
                if mod in _BLOCK:
                    out[f"{prefix}{_BLOCK[mod]}.{param}"] = x
                else:
                    unmapped.append(k)
        else:
            unmapped.append(k)
    if unmapped:
        raise ValueError(f"open_clip weights with no transformers CLIP counterpart: {', '.join(sorted(unmapped))}")
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


# ----------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------


def clip_bpe() -> tuple[dict[str, int], list[str]]:
    """(vocab token -> id, merges "a b") of OpenAI's CLIP tokenizer, from the BPE file open_clip ships.

    The vocabulary, as OpenAI's CLIP defines it: the 256 byte-level unicode symbols, the same
    with '</w>' (end of word), one symbol per merge (the first 48,894 merges of the file), then
    '<|startoftext|>' (49406) and '<|endoftext|>' (49407): 49,408 ids, as open_clip's
    SimpleTokenizer numbers them (it names the two special tokens <start_of_text> / <end_of_text>)."""
    import gzip

    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]  # line 0 is a version header
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    assert len(vocab) == len(tokens) == VOCAB_SIZE, (len(vocab), len(tokens))
    assert vocab["<|startoftext|>"] == SOT and vocab["<|endoftext|>"] == EOT
    return vocab, merges


def write_tokenizer(folder: Path, context_length: int):
    """vocab.json + merges.txt in `folder`, then a CLIPTokenizer built from them and saved beside.

    model_max_length = the student's context length, so `truncation=True` keeps [SOT, the first
    L-2 tokens, EOT] exactly as open_clip does. The pad token is '!' (id 0), so ids padded to
    `max_length` equal open_clip's (which pads with 0); split_special_tokens keeps a literal '!'
    (or '<|endoftext|>') in a caption ordinary text, tokenised by BPE as open_clip does, rather
    than matched as the special token."""
    import transformers

    vocab, merges = clip_bpe()
    folder = Path(folder)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    cls = getattr(transformers, "CLIPTokenizerFast", transformers.CLIPTokenizer)  # the same class in transformers 5
    tok = cls.from_pretrained(str(folder), pad_token=PAD_TOKEN, model_max_length=int(context_length),
                              split_special_tokens=True)
    ids = tok.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>", PAD_TOKEN])
    assert ids == [SOT, EOT, 0] and tok.pad_token_id == 0, ids
    return tok


# ----------------------------------------------------------------------------------
# Writing the folder
# ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' logging at error level and no progress bars: they would bypass hierdctl's console."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def write_hf(model, model_cfg: dict, preprocess_cfg: dict, folder: Path) -> list[str]:
    """Write the transformers CLIPModel files for the open_clip `model` (its weights,
    `model_cfg` its architecture, `preprocess_cfg` its eval preprocessing, as open_clip resolved
    it) into `folder` (created if needed; the files must not be there yet). Returns the names
    of the files written."""
    import transformers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    before = {p.name for p in folder.iterdir()}
    assert not (before & set(HF_FILES)), sorted(before & set(HF_FILES))  # never over files already there
    config, processor_kwargs = to_hf_config(model_cfg, preprocess_cfg)
    state = convert_state_dict(model.state_dict())
    with _quiet_transformers():
        hf = transformers.CLIPModel(config)
        hf.load_state_dict(state, strict=True)  # every tensor accounted for, both ways
        hf.save_pretrained(str(folder))
        tok = write_tokenizer(folder, config.text_config.max_position_embeddings)
        images = transformers.CLIPImageProcessor(**processor_kwargs)
        images.save_pretrained(str(folder))  # preprocessor_config.json: transformers 4.x, sentence-transformers
        transformers.CLIPProcessor(image_processor=images, tokenizer=tok).save_pretrained(str(folder))
    return sorted(p.name for p in folder.iterdir() if p.name not in before)


# What write_hf writes (transformers 5; 4.x also writes special_tokens_map.json).
HF_FILES = ("config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
            "processor_config.json", "preprocessor_config.json")
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json")


def write_tokenizer_files(folder: Path, context_length: int) -> list[str]:
    """The CLIPTokenizer files alone (what the ONNX text graph needs beside it): vocab.json,
    merges.txt, tokenizer.json, tokenizer_config.json (+ special_tokens_map.json with
    transformers 4). Returns the names written."""
    folder = Path(folder)
    before = {p.name for p in folder.iterdir()}
    assert not (before & set(TOKENIZER_FILES)), sorted(before & set(TOKENIZER_FILES))
    with _quiet_transformers():
        write_tokenizer(folder, context_length).save_pretrained(str(folder))
    return sorted(p.name for p in folder.iterdir() if p.name not in before)


def check_tokenizer(folder: Path, tokenizer, captions: list[str] | None = None) -> dict:
    """Load the tokenizer files in `folder` with transformers' AutoTokenizer, as a user does,
    and compare its ids (padded to the context, truncated) with open_clip's `tokenizer` on the
    probe captions. Raises ParityError when they differ."""
    import torch
    import transformers

    captions = list(captions or PROBE_CAPTIONS)
    with _quiet_transformers():
        tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    ids = tok(captions, padding="max_length", truncation=True, return_tensors="pt")["input_ids"]
    want = tokenizer(captions)
    match = tuple(ids.shape) == tuple(want.shape) and torch.equal(ids, want)
    check = {"class": type(tok).__name__, "context_length": int(tok.model_max_length), "captions": len(captions),
             "ids_match": bool(match)}
    if not match:
        raise ParityError(f"the tokenizer files give ids other than open_clip's on the probe captions ({check})")
    return check


# ----------------------------------------------------------------------------------
# Parity
# ----------------------------------------------------------------------------------


class ParityError(RuntimeError):
    """The transformers folder does not reproduce the open_clip model (a bug, not bad input)."""


# Ordinary captions: upper case, punctuation ('!' mid-word and at the end), digits, accents,
# apostrophes, repeated spaces, a tab; the last one is longer than any context and is truncated.
PROBE_CAPTIONS = [
    "a photo of a dog",
    "Two RED squares left of a blue circle.",
    "A man riding a bicycle down the street at 5 pm!!",
    "a bowl of fruit: 3 apples, 2 pears & a banana",
    "café au lait in a crème-coloured mug",
    "it's an  empty street\tat night, isn't it?",
    "x",
    " ".join(["a long caption about a cat sitting on a red sofa next to a window in the afternoon sun"] * 8),
]


def probe_images(size: int) -> list:
    """Two decoded RGB PIL images (JPEG round trip): a 3:2-ish landscape to be downscaled and a
    portrait to be upscaled to `size`. Gradients, noise and shapes: every pixel differs.

    Their sizes are picked so that centre-crop offsets are whole numbers: torchvision's
    CenterCrop (open_clip) rounds half offsets and transformers floors them (a one-pixel shift),
    which is a known difference of the crop, not of the resampling this probe measures."""
    import io

    import numpy as np
    from PIL import Image, ImageDraw

    def make(w: int, h: int, seed: int):
        rng = np.random.default_rng(seed)
        yy, xx = np.mgrid[0:h, 0:w]
        a = np.stack([xx * 255.0 / w, yy * 255.0 / h, (xx + yy) * 127.0 / (w + h)], -1) + rng.normal(0, 20, (h, w, 3))
        img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
            draw.ellipse([x0, y0, x0 + w // 4, y0 + h // 4], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")

    m = -(-size // 4)  # long sides resize to size + 2m: offset m, whole, in both libraries
    sizes = [(2 * size + 4 * m, 2 * size)]  # (w, h): short side 2·size, downscaled
    if size % 2 == 0 and size >= 8:
        sizes.append((size // 2, size // 2 + m))  # short side size/2, upscaled: long side size + 2m
    for w, h in sizes:  # invariant: both crop offsets agree
        short, long = min(w, h), max(w, h)
        resized = int(size * long / short)
        assert int(round((resized - size) / 2.0)) == (resized - size) // 2, (w, h, size)
    return [make(w, h, seed) for seed, (w, h) in enumerate(sizes)]


def _embeds(out):
    """get_*_features returns a tensor (transformers 4) or an output with .pooler_output (5)."""
    import torch
    import torch.nn.functional as F

    x = out if isinstance(out, torch.Tensor) else out.pooler_output
    return F.normalize(x.float(), dim=-1)


def _max_diff(a, b) -> float:
    return float((a.double() - b.double()).abs().max())


def check_parity(model, folder: Path, tokenizer, preprocess, captions: list[str] | None = None) -> dict:
    """Load `folder` back with transformers and compare it with the open_clip `model` (its
    `tokenizer` and eval `preprocess`); returns the checks; raises ParityError over a tolerance."""
    import torch
    import transformers

    captions = list(captions or PROBE_CAPTIONS)
    with _quiet_transformers():
        hf = transformers.CLIPModel.from_pretrained(str(folder)).eval()
        proc = transformers.CLIPProcessor.from_pretrained(str(folder))
    size = _square(model.visual.image_size)
    context = int(hf.config.text_config.max_position_embeddings)
    images = probe_images(size)

    # (c) Pixels: the processor vs open_clip's eval transform, on the same decoded images.
    px_oc = torch.stack([preprocess(im) for im in images])  # (B,3,S,S)
    px_hf = proc(images=images, return_tensors="pt")["pixel_values"]
    assert px_hf.shape == px_oc.shape, (tuple(px_hf.shape), tuple(px_oc.shape))
    std = torch.tensor(proc.image_processor.image_std, dtype=torch.float64).view(1, 3, 1, 1)
    pixel = {"class": type(proc.image_processor).__name__, "images": [list(im.size) for im in images],
             "max_abs_diff": _max_diff(px_hf, px_oc),  # normalised, as the model sees them
             "max_levels": float(((px_hf.double() - px_oc.double()) * std * 255).abs().max()),  # grey levels of 255
             "atol_levels": PIXEL_ATOL_LEVELS}

    # (a) Image embeddings of the same pixel tensors: open_clip's, plus one of noise.
    g = torch.Generator().manual_seed(0)
    px = torch.cat([px_oc, torch.randn(1, 3, size, size, generator=g)])
    # (b) Text: each library tokenises the captions itself; padded to the context, the ids must be equal.
    ids_oc = tokenizer(captions)  # (N,L) int64
    enc = proc(text=captions, padding="max_length", truncation=True, return_tensors="pt")
    dyn = proc(text=captions, padding=True, truncation=True, return_tensors="pt")  # as sentence-transformers calls it
    ids_match = tuple(enc["input_ids"].shape) == tuple(ids_oc.shape) and torch.equal(enc["input_ids"], ids_oc)
    with torch.inference_mode():
        img_oc, img_hf = model.encode_image(px, normalize=True), _embeds(hf.get_image_features(pixel_values=px))
        txt_oc = model.encode_text(ids_oc, normalize=True)
        txt_hf = _embeds(hf.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]))
        txt_dyn = _embeds(hf.get_text_features(input_ids=dyn["input_ids"], attention_mask=dyn["attention_mask"]))
    checks = {
        "folder": Path(folder).name,
        "transformers": transformers.__version__,
        "image": {"max_abs_diff": _max_diff(img_hf, img_oc), "atol": EMBED_ATOL, "batch": int(px.shape[0])},
        "text": {"max_abs_diff": _max_diff(txt_hf, txt_oc), "dynamic_padding_max_abs_diff": _max_diff(txt_dyn, txt_oc),
                 "atol": EMBED_ATOL, "captions": len(captions), "context_length": context, "ids_match": ids_match},
        "image_processor": pixel,
    }
    if not ids_match:
        raise ParityError(f"CLIPTokenizer ids differ from open_clip's on the probe captions (context {context})")
    for part, key, tol in (("image", "max_abs_diff", "atol"), ("text", "max_abs_diff", "atol"),
                           ("text", "dynamic_padding_max_abs_diff", "atol"), ("image_processor", "max_levels", "atol_levels")):
        c = checks[part]
        if not c[key] <= c[tol]:  # NaN fails too
            raise ParityError(f"{part} {key.replace('_', ' ')} {c[key]:.3g} > {c[tol]:.3g}")
    return checks

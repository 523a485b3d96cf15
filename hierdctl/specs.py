"""The model-spec grammar, shared by teachers, students and evaluation.

    open_clip:ARCH                 open_clip architecture, random init (students; seed 0 elsewhere)
    open_clip:ARCH/TAG             open_clip pretrained tag (downloaded through open_clip's cache)
    open_clip:ARCH/PATH            open_clip architecture + a checkpoint file (.pt/.bin/.safetensors)
    open_clip:CONFIG.json[/W]      a custom open_clip model-config JSON, random init or weights W
    open_clip:hf-hub:ORG/REPO      open_clip's own hf-hub: loading
    local-dir:PATH                 open_clip's `open_clip_config.json` + `open_clip_model.safetensors`
    hf:REPO_OR_PATH                a Hugging Face transformers CLIPModel

`load_encoder(spec)` returns a `ClipEncoder`: one frozen-inference interface over both
back ends, exposing the pooled embedding, the patch tokens projected into the joint
space, the preprocessing and the logit scale. Heavy libraries are imported lazily.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import UserError

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


@dataclass(frozen=True)
class ModelSpec:
    raw: str
    kind: str  # "open_clip" | "local-dir" | "hf"
    arch: str | None = None  # open_clip model name, "hf-hub:..." or a config JSON path
    weights: str | None = None  # pretrained tag or checkpoint path (open_clip only)
    path: str | None = None  # local-dir path or hf repo/path

    @property
    def is_random_init(self) -> bool:
        return self.kind == "open_clip" and self.weights is None and not (self.arch or "").startswith("hf-hub:")


def parse_spec(text: str, where: str = "--model") -> ModelSpec:
    """Parse a model spec; a malformed one is a UserError naming `where`."""
    if not text or ":" not in text:
        raise UserError(
            f"model spec {text!r} has no scheme; use open_clip:ARCH[/TAG|/CKPT], "
            "open_clip:CONFIG.json[/CKPT], local-dir:PATH or hf:REPO_OR_PATH",
            where,
        )
    scheme, rest = text.split(":", 1)
    if not rest:
        raise UserError(f"model spec {text!r} names nothing after '{scheme}:'", where)
    if scheme == "local-dir":
        p = Path(rest)
        if not (p / "open_clip_config.json").is_file():
            raise UserError(f"{rest} is not an open_clip local dir (no open_clip_config.json)", where)
        return ModelSpec(text, "local-dir", path=str(p))
    if scheme == "hf":
        return ModelSpec(text, "hf", path=hf_folder(rest))
    if scheme == "open_clip":
        if rest.startswith("hf-hub:"):
            return ModelSpec(text, "open_clip", arch=rest)
        if ".json" in rest:  # a custom model-config file, maybe followed by /WEIGHTS
            cut = rest.index(".json") + len(".json")
            arch, weights = rest[:cut], rest[cut:].lstrip("/") or None
            if not Path(arch).is_file():
                raise UserError(f"model config {arch} does not exist", where)
        elif "/" in rest:
            arch, weights = rest.split("/", 1)
        else:
            arch, weights = rest, None
        if weights and (weights.endswith(CHECKPOINT_SUFFIXES) or os.sep in weights) and not Path(weights).is_file():
            raise UserError(f"checkpoint {weights} does not exist", where)
        return ModelSpec(text, "open_clip", arch=arch, weights=weights)
    raise UserError(f"unknown model-spec scheme {scheme!r} in {text!r} (open_clip, local-dir, hf)", where)


def hf_folder(path: str) -> str:
    """Where a transformers CLIPModel lies for `hf:PATH`: PATH itself, except for an export of
    hierdctl's first layout (export.json without "layout"), whose transformers files are in PATH/hf
    (exports of layout 2 have them at their root, beside open_clip's). A hub repo id is as given."""
    p = Path(path)
    if (p / "config.json").is_file() or not (p / "hf" / "config.json").is_file():
        return path
    try:
        marker = json.loads((p / "export.json").read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return path
    ours = isinstance(marker, dict) and str(marker.get("schema", "")).startswith("hierdctl.export/")
    return str(p / "hf") if ours and marker.get("layout", 1) == 1 else path


def fingerprint_state_dict(state_dict) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    import torch

    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ----------------------------------------------------------------------------------
# open_clip construction (also used for students)
# ----------------------------------------------------------------------------------


def register_model_config(open_clip, cfg: dict, name: str | None = None, where: str = "--model",
                          origin: str = "the model_cfg") -> str:
    """Register an open_clip model-config dict (vision_cfg, text_cfg, embed_dim, ...) with
    open_clip under `name` (default: hierdctl-<hash of the config>, so registering the same
    config twice is harmless); return the name for open_clip.create_model."""
    if not isinstance(cfg, dict) or "vision_cfg" not in cfg or "text_cfg" not in cfg:
        raise UserError(f"{origin} is not an open_clip model config (needs vision_cfg and text_cfg)", where)
    text = json.dumps(cfg, sort_keys=True)
    name = name or "hierdctl-" + hashlib.sha256(text.encode()).hexdigest()[:12]
    open_clip.factory._MODEL_CONFIGS[name] = json.loads(text)  # a copy: open_clip may edit its configs
    return name


def _register_config(open_clip, path: str) -> str:
    """Register a model-config JSON with open_clip under a name of its own; return that name."""
    cfg = json.loads(Path(path).read_text())
    return register_model_config(open_clip, cfg, "hierdctl-" + Path(path).stem, "--model", origin=path)


def create_open_clip(spec: ModelSpec, device: str = "cpu", where: str = "--model"):
    """(model, eval_preprocess, tokenizer, model_name) for an open_clip or local-dir spec."""
    import open_clip
    if spec.kind == "local-dir":
        name, pretrained = f"local-dir:{spec.path}", None
    elif spec.arch.endswith(".json"):
        name, pretrained = _register_config(open_clip, spec.arch), spec.weights
    else:
        name, pretrained = spec.arch, spec.weights
        shipped = Path(__file__).parent / "model_configs" / f"{name}.json"
        if name not in open_clip.list_models() and shipped.is_file():  # ViT-T-16 (CLIP-RD's student), tiny-test
            register_model_config(open_clip, json.loads(shipped.read_text()), name, where, origin=str(shipped))
        if not name.startswith("hf-hub:") and name not in open_clip.list_models():
            raise UserError(f"unknown open_clip architecture {name!r} (see open_clip.list_models())", where)
    check_hub_weights(spec, _hub_files(open_clip, spec, name, pretrained), where)
    if spec.kind == "local-dir":
        check_export_digests(Path(spec.path), where)
    try:
        with _weights_only_loading(random_init=spec.is_random_init):
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device)
            tokenizer = open_clip.get_tokenizer(name)
    except Exception as e:
        if isinstance(e, pickle.UnpicklingError) or _raised_while_unpickling(e):
            raise UserError(_refused(spec, e), where) from None
        damaged = type(e).__name__ == "SafetensorError" or "zip archive" in str(e) or isinstance(e, EOFError)
        if not (damaged or isinstance(e, (RuntimeError, FileNotFoundError, ValueError, OSError))):
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        file = _weights_file(spec)
        if damaged and file is not None:  # a cut, emptied or overwritten weights file: name it
            raise UserError(f"cannot load {spec.raw}: {file} is not a complete weights file ({msg[:160]}); it "
                            "may be truncated or damaged: copy or export it again", where) from None
        raise UserError(f"cannot load {spec.raw}: {msg}" + (f" ({file})" if file else ""), where) from None
    return model, preprocess, tokenizer, name


def _weights_file(spec: ModelSpec) -> Path | None:
    """The local weights file a spec loads, when there is one."""
    if spec.kind == "local-dir":
        for n in LOCAL_DIR_WEIGHTS:
            if (Path(spec.path) / n).is_file():
                return Path(spec.path) / n
        return None
    return Path(spec.weights) if spec.weights and Path(spec.weights).is_file() else None


LOCAL_DIR_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
EXPORT_SCHEMA = "hierdctl.export/1"  # stages/export.py's export.json (the digests of what it wrote)


def check_export_digests(folder: Path, where: str) -> None:
    """A local dir exported by hierdctl records the sha256 of every file in its export.json: the
    files a loader reads (config and weights) must still have it, so a cut, emptied or zeroed
    file (one that keeps its size, too) is one line naming it, not a traceback or silent
    garbage. A folder without that record is loaded as it is."""
    try:
        record = json.loads((folder / "export.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return
    if not isinstance(record, dict) or record.get("schema") != EXPORT_SCHEMA or not isinstance(record.get("sha256"),
                                                                                                dict):
        return
    from .atomic import sha256_file

    for name in ("open_clip_config.json", *LOCAL_DIR_WEIGHTS):
        want, p = record["sha256"].get(name), folder / name
        if want and p.is_file() and sha256_file(p) != want:
            raise UserError(f"{p} is not the file hierdctl exported: its sha256 differs from the one export.json "
                            "recorded (it was cut, zeroed or changed after export); export or copy it again", where)


# ----------------------------------------------------------------------------------
# Loading weights safely: never unpickle code, never hang on an unreachable hub
# ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _weights_only_loading(random_init: bool = False):
    """Around open_clip's model creation.

    torch.load is weights-only whatever the environment says: open_clip retries a
    weights-only load that raised TypeError without `weights_only`, which
    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 turns into a full unpickling (a crafted checkpoint
    raises TypeError under the weights-only unpickler on purpose, then runs its payload).
    open_clip's and the hub's log lines are held back: a failure is one line, said by
    hierdctl; on success open_clip's own warnings are passed on, except "No pretrained weights
    loaded" for a spec that asks for random init (every distill run would print it)."""
    saved = {k: os.environ.get(k) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    records: list[logging.LogRecord] = []

    class _Hold(logging.Handler):
        def emit(self, record):
            records.append(record)

    root, hub = logging.getLogger(), logging.getLogger("huggingface_hub")
    configured, hub_level, hold = bool(root.handlers), hub.level, _Hold(logging.WARNING)
    root.addHandler(hold)  # a root handler also keeps open_clip's logging.error() from calling basicConfig()
    hub.setLevel(logging.ERROR)  # "Retrying in 1s [Retry 1/5]" ...
    ok = False
    try:
        yield
        ok = True
    finally:
        root.removeHandler(hold)
        hub.setLevel(hub_level)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if ok and not configured:
            for r in records:
                if r.name != "root":  # the hub's own loggers printed theirs already
                    continue
                if random_init and r.getMessage().startswith("No pretrained weights loaded"):
                    continue
                root.handle(r)  # open_clip's module-level logging calls


def _raised_while_unpickling(e: BaseException) -> bool:
    """True if `e` comes from inside torch's weights-only unpickler (a TypeError, ValueError,
    IndexError... of a crafted pickle stream), not from building or loading the model."""
    tb = e.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.endswith("_weights_only_unpickler.py"):
            return True
        tb = tb.tb_next
    return False


def _refused(spec: ModelSpec, e: BaseException) -> str:
    what = spec.raw
    if spec.kind == "local-dir":
        what = f"the weights in {spec.path}"
    elif spec.weights and Path(spec.weights).is_file():
        what = spec.weights
    m = re.search(r"WeightsUnpickler error: (.*?)(?: was not an allowed global|\.? ?$)", str(e), re.M)
    detail = m.group(1) if m else f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:100]}"
    detail = detail.strip().rstrip(" ,.;:")
    return (f"{what} is refused: it holds pickled Python objects that torch.load(weights_only=True) does not "
            f"allow ({detail}); hierdctl never runs pickle code: convert the checkpoint to .safetensors "
            "or save a plain state dict of tensors")


_HUB_WEIGHTS = ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]


def _hub_files(open_clip, spec: ModelSpec, name: str, pretrained: str | None):
    """(repo id, groups of file names) for a spec whose weights come from the Hugging Face hub
    (one file of each group must be there); None for local files and random init."""
    if name.startswith("hf-hub:"):
        return name[len("hf-hub:"):], [["open_clip_config.json"], _HUB_WEIGHTS]
    if spec.kind != "open_clip" or not pretrained or Path(pretrained).is_file():
        return None
    hub = (open_clip.get_pretrained_cfg(name, pretrained) or {}).get("hf_hub")
    if not hub:
        return None
    repo, filename = os.path.split(hub)
    if not filename or filename == _HUB_WEIGHTS[1]:
        return repo, [_HUB_WEIGHTS]
    if filename.endswith((".bin", ".pth")):  # open_clip prefers a .safetensors sibling
        return repo, [[filename[:-4] + ".safetensors", filename]]
    return repo, [[filename]]


def check_hub_weights(spec: ModelSpec, need, where: str) -> None:
    """Fail fast, in one line, when a spec's hub files are not in the local cache and cannot be
    fetched: at once under HF_HUB_OFFLINE, else after one HEAD request with a short timeout
    (HF_HUB_ETAG_TIMEOUT, default 5 s) instead of the hub client's retries with backoff
    (~45 log lines and ~50 s per spec with no network)."""
    if need is None:
        return
    repo, groups = need
    try:
        from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
        from huggingface_hub.errors import HfHubHTTPError

        missing = [g for g in groups if not any(isinstance(try_to_load_from_cache(repo, f), str) for f in g)]
    except Exception:  # no hub client, or not a repo id: the loader says what is wrong
        return
    if not missing:
        return
    what = f"{repo}/{missing[0][-1]}"
    offline = constants.is_offline_mode() if hasattr(constants, "is_offline_mode") else constants.HF_HUB_OFFLINE
    local = "or give a local file (open_clip:ARCH/PATH.safetensors, local-dir:PATH)"
    if offline:
        raise UserError(f"cannot load {spec.raw}: {what} is not in the local Hugging Face cache "
                        f"({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set: download it once with network "
                        f"access, {local}", where)
    timeout = float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or 5)
    try:
        get_hf_file_metadata(hf_hub_url(repo, missing[0][-1]), timeout=timeout)
    except HfHubHTTPError:
        return  # the hub answered (not found, gated...): the loader reports what it said
    except Exception as e:
        reason = (str(e).splitlines() or [""])[0][:120] or type(e).__name__
        raise UserError(f"cannot load {spec.raw}: {what} is not in the local Hugging Face cache and "
                        f"{constants.ENDPOINT} cannot be reached ({reason}); connect to the network, set "
                        f"HF_ENDPOINT to a reachable mirror or HF_HUB_OFFLINE=1, {local}", where) from None


# ----------------------------------------------------------------------------------
# A uniform frozen encoder
# ----------------------------------------------------------------------------------


class ClipEncoder:
    """Frozen inference over an open_clip or transformers CLIP model.

    encode_image(x (B,3,H,W)) -> (emb (B,D) L2-normalised, patch (B,G,D) or None)
        `patch` are the final-layer patch tokens (after the final norm) multiplied by the
        visual projection, so they live in the joint space; unnormalised.
    encode_text(tokens) -> (emb (B,D) L2-normalised, token features (B,L,W) or None)
    """

    backend: str
    embed_dim: int
    image_size: int
    patch_grid: tuple[int, int] | None
    logit_scale: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    eval_transform: Callable  # PIL.Image (RGB) -> (3,S,S) float tensor
    tokenize: Callable  # list[str] -> tensor (B,L) or (B,2,L) (ids, mask) for hf

    def __init__(self, spec: ModelSpec, model, device: str):
        self.spec, self.model, self.device = spec, model, device
        self.model.eval().requires_grad_(False)

    def fingerprint(self) -> str:
        return fingerprint_state_dict(self.model.state_dict())

    def describe(self) -> dict:
        return {
            "spec": self.spec.raw,
            "backend": self.backend,
            "embed_dim": self.embed_dim,
            "image_size": self.image_size,
            "patch_grid": list(self.patch_grid) if self.patch_grid else None,
            "logit_scale": self.logit_scale,
            "mean": list(self.mean),
            "std": list(self.std),
        }


class OpenClipEncoder(ClipEncoder):
    backend = "open_clip"

    def __init__(self, spec: ModelSpec, device: str, where: str):
        model, preprocess, tokenizer, self.model_name = create_open_clip(spec, device, where)
        super().__init__(spec, model, device)
        v = model.visual
        size = v.image_size
        self.image_size = size[0] if isinstance(size, (tuple, list)) else int(size)
        self.eval_transform = preprocess
        self.tokenize = tokenizer
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

        pp = getattr(v, "preprocess_cfg", {}) or {}
        self.mean = tuple(pp.get("mean", OPENAI_DATASET_MEAN))
        self.std = tuple(pp.get("std", OPENAI_DATASET_STD))
        self.logit_scale = float(model.logit_scale.exp().item())
        # Patch tokens exist for open_clip's own VisionTransformer (class token + grid).
        vit = all(hasattr(v, a) for a in ("_embeds", "transformer", "_pool", "grid_size"))
        self.patch_grid = tuple(v.grid_size) if vit and getattr(v, "attn_pool", None) is None else None
        with __import__("torch").no_grad():  # the joint width, whatever the projection's form
            self.embed_dim = int(model.encode_text(tokenizer(["a"]).to(device)).shape[-1])

    def encode_image(self, x, want_patches: bool = False):
        import torch.nn.functional as F

        v = self.model.visual
        if not want_patches or self.patch_grid is None:
            return F.normalize(self.model.encode_image(x), dim=-1), None
        # The same computation as VisionTransformer.forward, keeping the tokens.
        h = v.transformer(v._embeds(x))
        pooled, tokens = v._pool(h)
        if v.proj is not None:
            pooled, tokens = pooled @ v.proj, tokens @ v.proj
        return F.normalize(pooled, dim=-1), tokens

    def encode_text(self, tokens, want_tokens: bool = False):
        import torch
        import torch.nn.functional as F

        if not want_tokens:
            # Padding after the batch's last token changes nothing in open_clip's causal text
            # tower: cut it (captions of ~15 tokens in a 77-token context cost 3-5× less).
            from .student import encode_text_trimmed

            return F.normalize(encode_text_trimmed(self.model, tokens), dim=-1), None
        t = self.model.text if hasattr(self.model, "text") else None
        if t is not None:  # CustomTextCLIP
            was = t.output_tokens
            t.output_tokens = True
            try:
                pooled, tok = t(tokens)
            finally:
                t.output_tokens = was
            return F.normalize(pooled, dim=-1), tok
        # CLIP.encode_text, keeping the per-token features after the final norm.
        from open_clip.transformer import text_global_pool

        m = self.model
        cast = m.transformer.get_cast_dtype()
        x = m.token_embedding(tokens).to(cast) + m.positional_embedding.to(cast)
        x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask))  # (B,L,W)
        pooled = text_global_pool(x, tokens, m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None))
        pooled = m.text_projection(pooled) if isinstance(m.text_projection, torch.nn.Linear) else pooled @ m.text_projection
        return F.normalize(pooled, dim=-1), x


class HFClipEncoder(ClipEncoder):
    backend = "hf"

    def __init__(self, spec: ModelSpec, device: str, where: str):
        import torch

        try:
            from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel
        except ImportError as e:
            raise UserError("hf: specs need transformers (pip install 'hierdctl[hf]')", where) from e
        if not Path(spec.path).exists():
            check_hub_weights(spec, (spec.path, [["config.json"], ["model.safetensors", "pytorch_model.bin"]]), where)
        try:
            model = CLIPModel.from_pretrained(spec.path).to(device)
            proc = CLIPImageProcessor.from_pretrained(spec.path)
            tok = AutoTokenizer.from_pretrained(spec.path)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load {spec.raw}: {str(e).splitlines()[0]}", where) from e
        super().__init__(spec, model, device)
        crop = proc.crop_size
        self.image_size = int(crop if isinstance(crop, int) else crop["height"])  # dict (transformers 4), SizeDict (5)
        size = proc.size
        short = int(size) if isinstance(size, int) else int(size.get("shortest_edge") or self.image_size)
        self.mean, self.std = tuple(proc.image_mean), tuple(proc.image_std)
        self.eval_transform = _pil_eval_transform(short, self.image_size, self.mean, self.std)
        vc = model.config.vision_config
        g = vc.image_size // vc.patch_size
        self.patch_grid = (g, g)
        self.embed_dim = int(model.config.projection_dim)
        self.logit_scale = float(model.logit_scale.exp().item())
        ctx = int(model.config.text_config.max_position_embeddings)

        def tokenize(texts):
            enc = tok(list(texts), padding="max_length", truncation=True, max_length=ctx, return_tensors="pt")
            return torch.stack([enc["input_ids"], enc["attention_mask"]], dim=1)  # (B,2,L)

        self.tokenize = tokenize

    def encode_image(self, x, want_patches: bool = False):
        import torch.nn.functional as F

        m = self.model
        out = m.vision_model(pixel_values=x)
        pooled = m.visual_projection(out.pooler_output)
        patches = None
        if want_patches:
            patches = m.visual_projection(m.vision_model.post_layernorm(out.last_hidden_state[:, 1:]))
        return F.normalize(pooled, dim=-1), patches

    def encode_text(self, tokens, want_tokens: bool = False):
        import torch.nn.functional as F

        m = self.model
        out = m.text_model(input_ids=tokens[:, 0], attention_mask=tokens[:, 1])
        emb = F.normalize(m.text_projection(out.pooler_output), dim=-1)
        return emb, (out.last_hidden_state if want_tokens else None)


def _pil_eval_transform(short: int, crop: int, mean, std):
    """Resize the shorter side (bicubic), centre-crop, normalise: CLIP's eval preprocessing."""
    import numpy as np
    import torch
    from PIL import Image

    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)

    def tf(img):
        w, h = img.size
        r = short / min(w, h)
        img = img.resize((max(crop, round(w * r)), max(crop, round(h * r))), Image.BICUBIC)
        w, h = img.size
        x0, y0 = int(round((w - crop) / 2.0)), int(round((h - crop) / 2.0))
        img = img.crop((x0, y0, x0 + crop, y0 + crop))
        t = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
        return (t - m) / s

    tf.resize_crop = (short, crop)  # what hierdctl/grounding.py maps boxes through (its rounding: above)
    return tf


def load_encoder(text: str, device: str = "cpu", where: str = "--model") -> ClipEncoder:
    spec = parse_spec(text, where)
    if spec.kind == "hf":
        return HFClipEncoder(spec, device, where)
    if spec.is_random_init:
        # A random-init teacher or evaluation model (benchmarks, bootstrap caches) is the same
        # model in every process and every rerun: seed 0, without touching the caller's RNG.
        import torch

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return OpenClipEncoder(spec, device, where)
    return OpenClipEncoder(spec, device, where)

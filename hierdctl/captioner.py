"""Synthetic captions at cache time: an open_clip CoCa model's own `generate` (DataCompDR).

`cache-teacher --captioner SPEC --synthetic-captions N` writes N generated captions per image
next to the real ones; the teacher embeds them (and chunks and perturbs them) like any
caption. Captions are sampled with top-p (p = 0.9, temperature 1, at most 30 tokens) from
the image's eval view; the random draws of each image come from a generator seeded by
(seed, the image's sha256), so a cache is the same whatever the batching, the rank or a
resume. Beam search is not used: transformers 5 removed the scorer open_clip's beam search
needs, and with it open_clip 3.3 switches off all of CoCa's `generate` (`enable_coca_sampling`
gives top-p sampling back). A randomly initialised CoCa (the tests') writes meaningless
text: the path is real, the captions are not.
"""

from __future__ import annotations

import hashlib

import torch

from .errors import UserError

TOP_P, TEMPERATURE, MAX_TOKENS = 0.9, 1.0, 30


def enable_coca_sampling() -> None:
    """open_clip 3.3's coca_model imports transformers' generation helpers in one `try`, beside
    `BeamSearchScorer`, which transformers 5 removed: the failed import marks transformers as
    absent and CoCa's `generate` refuses every generation type. Give the module the helpers
    top-p sampling uses (beam search stays unavailable). Works whatever was imported first."""
    import importlib.util

    import open_clip.coca_model as coca

    if coca._has_transformers or importlib.util.find_spec("transformers") is None:
        return
    import transformers

    names = ("LogitsProcessorList", "TopPLogitsWarper", "TopKLogitsWarper", "RepetitionPenaltyLogitsProcessor",
             "MinLengthLogitsProcessor", "MaxLengthCriteria", "StopStringCriteria", "EosTokenCriteria",
             "StoppingCriteriaList")
    for name in names:
        setattr(coca, name, getattr(transformers, name))
    coca.GENERATION_TYPES.update(top_k=transformers.TopKLogitsWarper, top_p=transformers.TopPLogitsWarper)
    coca._has_transformers = True


class Captioner:
    def __init__(self, spec: str, device: str, n: int, seed: int, where: str = "--captioner"):
        from .specs import create_open_clip, parse_spec

        enable_coca_sampling()
        parsed = parse_spec(spec if ":" in spec else f"open_clip:{spec}", where)
        if parsed.kind not in ("open_clip", "local-dir"):
            raise UserError("the captioner is an open_clip CoCa model (open_clip:coca_…, local-dir: or a config JSON)",
                            where)
        with torch.random.fork_rng(devices=[]):  # a random-init captioner is the same model in every process
            torch.manual_seed(0)
            self.model, self.eval_transform, self.tokenizer, _ = create_open_clip(parsed, device, where)
        if not hasattr(self.model, "generate") or not hasattr(self.model, "text_decoder"):
            raise UserError(f"{spec} is not a CoCa model (it cannot generate captions)", where)
        self.model.eval().requires_grad_(False)
        v = self.model.visual
        size = v.image_size
        self.image_size = size[0] if isinstance(size, (tuple, list)) else int(size)
        self.spec, self.device, self.n, self.seed = spec, device, n, seed
        self.failed = 0  # images whose sampling met non-finite probabilities (they get no synthetic caption)

    def describe(self) -> dict:
        from .specs import fingerprint_state_dict

        return {"spec": self.spec, "per_image": self.n, "sampling": {"top_p": TOP_P, "temperature": TEMPERATURE,
                                                                       "max_tokens": MAX_TOKENS},
                "fingerprint": fingerprint_state_dict(self.model.state_dict())}

    @torch.no_grad()
    def captions(self, pixels: torch.Tensor, sha256: str) -> list[str]:
        """Up to n distinct captions for one image's eval view (3,S,S), deterministic per image."""
        import open_clip

        decode = open_clip.decode
        x = pixels.unsqueeze(0).expand(self.n, -1, -1, -1).to(self.device)  # one image, n samples in a batch
        with torch.random.fork_rng(devices=[self.device] if self.device.startswith("cuda") else []):
            torch.manual_seed(int(hashlib.sha256(f"{self.seed}:{sha256}".encode()).hexdigest()[:15], 16))
            try:
                tokens = self.model.generate(x, generation_type="top_p", top_p=TOP_P, temperature=TEMPERATURE,
                                             seq_len=MAX_TOKENS)
            except RuntimeError as e:  # torch.multinomial on NaN/inf probabilities: the model's, not the image's
                if "probability tensor" not in str(e):
                    raise
                self.failed += 1
                return []
        out: list[str] = []
        for row in tokens.cpu():
            text = decode(row).split("<end_of_text>")[0].replace("<start_of_text>", "")
            text = " ".join(text.split())
            if text and text not in out:
                out.append(text)
        return out

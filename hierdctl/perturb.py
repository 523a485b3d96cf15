"""Structure-preserving caption perturbations: compositional hard negatives from noun chunks.

Generic text operations on a caption and its parsed noun chunks (hierdctl/phrases.py), so
they apply to real captions, not to one benchmark's grammar:

    swap_modifiers  two chunks exchange their modifier words (between determiner and head):
                    "a red circle next to a blue square" -> "a blue circle next to a red square"
    swap_heads      two chunks exchange their head nouns:
                    "a red circle next to a blue square" -> "a red square next to a blue circle"
    swap_chunks     two chunks exchange places around the words between them (a relation):
                    "a red circle next to a blue square" -> "a blue square next to a red circle"

Each keeps every word of the caption and changes what binds to what, which is what a
bag-of-words model cannot tell apart (NegCLIP's argument). Candidates equal to the caption
are dropped; the Q kept are drawn deterministically from (seed, caption). The teacher's
embeddings of them are cached, so distill can transfer the teacher's preference between a
caption and its perturbations (docs/hierd.md).
"""

from __future__ import annotations

import hashlib

import numpy as np

# Words that open a noun chunk and are not modifiers: articles, numbers, quantifiers, possessives.
DETERMINERS = frozenset(
    "a an the this that these those some any each every no another either neither "
    "one two three four five six seven eight nine ten several many few both all "
    "my your his her its our their".split()
)


def split_chunk(chunk: str) -> tuple[list[str], list[str], str]:
    """(determiner words, modifier words, head noun) of a noun chunk; the head is its last word."""
    words = chunk.split()
    i = 0
    while i < len(words) - 1 and words[i].lower() in DETERMINERS:
        i += 1
    return words[:i], words[i:-1], words[-1]


def _locate(caption: str, chunks: list[str]) -> list[tuple[int, int, str]]:
    """(start, end, chunk) of each chunk found in the caption, left to right, not overlapping."""
    low, out, pos = caption.lower(), [], 0
    for c in chunks:
        i = low.find(c.lower(), pos)
        if i >= 0 and c.strip():
            out.append((i, i + len(c), caption[i:i + len(c)]))
            pos = i + len(c)
    return out


def _article(words: list[str]) -> list[str]:
    """'a'/'an' agreeing with the word after it (a chunk that got another modifier or head)."""
    if len(words) >= 2 and words[0].lower() in ("a", "an"):
        an = words[1][:1].lower() in "aeiou"
        words = [("An" if an else "A") if words[0][0].isupper() else ("an" if an else "a")] + words[1:]
    return words


def candidates(caption: str, chunks: list[str]) -> list[tuple[str, str]]:
    """Every (kind, perturbed caption) for every pair of chunks, in a fixed order, deduplicated."""
    spans = _locate(caption, chunks)
    out: dict[str, str] = {}

    def put(kind: str, replaced: dict[int, str]) -> None:
        text, last = [], 0
        for k, (a, b, _) in enumerate(spans):
            text += [caption[last:a], replaced.get(k, caption[a:b])]
            last = b
        new = "".join(text + [caption[last:]])
        if new.lower() != caption.lower() and new not in out:
            out[new] = kind

    for i in range(len(spans)):
        for j in range(i + 1, len(spans)):
            ci, cj = spans[i][2], spans[j][2]
            (di, mi, hi), (dj, mj, hj) = split_chunk(ci), split_chunk(cj)
            if mi or mj:
                put("swap_modifiers", {i: " ".join(_article(di + mj + [hi])), j: " ".join(_article(dj + mi + [hj]))})
            if hi.lower() != hj.lower():
                put("swap_heads", {i: " ".join(_article(di + mi + [hj])), j: " ".join(_article(dj + mj + [hi]))})
            if ci.lower() != cj.lower():
                put("swap_chunks", {i: cj, j: ci})
    return [(kind, text) for text, kind in out.items()]


def perturb(caption: str, chunks: list[str], q: int, seed: int) -> list[str]:
    """Up to q perturbations of `caption`, drawn deterministically from (seed, caption)."""
    cands = [t for _, t in candidates(caption, chunks)]
    if len(cands) <= q:
        return cands
    h = int(hashlib.sha256(caption.encode("utf-8")).hexdigest()[:15], 16)
    rng = np.random.default_rng([seed, h])
    keep = sorted(rng.choice(len(cands), size=q, replace=False).tolist())
    return [cands[k] for k in keep]

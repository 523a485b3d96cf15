"""Noun-phrase chunking of captions (the text side of HieRD's hierarchy).

Back ends: spaCy's `noun_chunks` when an English pipeline is installed (`en_core_web_sm`
or another named by the user), else TextBlob's bundled pattern parser, which needs no
download. `auto` picks spaCy if it loads. Phrases keep their determiners ("a red
circle"), are de-duplicated in order, and at most `max_phrases` are kept.
"""

from __future__ import annotations

from .errors import UserError

# The chunker reads at most this many words of a caption (captions are already at most
# sources.MAX_CAPTION_CHARS): its cost grows faster than linearly with the text (a caption of
# 1,000 one-letter words took 0.3 s, 1 MB took 42 s), and CLIP's 77 tokens end well before.
MAX_CHUNK_WORDS = 128


class Chunker:
    def __init__(self, backend: str = "auto", spacy_model: str = "en_core_web_sm"):
        self.backend = backend
        self._nlp = None
        if backend in ("auto", "spacy"):
            try:
                import spacy

                self._nlp = spacy.load(spacy_model, disable=["ner", "lemmatizer"])
                self.backend = f"spacy:{spacy_model}"
            except (ImportError, OSError) as e:
                if backend == "spacy":
                    raise UserError(f"spaCy model {spacy_model!r} is not installed ({e})", "--chunker") from e
        if self._nlp is None:
            if backend not in ("auto", "textblob", "spacy"):
                raise UserError(f"unknown chunker {backend!r} (auto, spacy, textblob)", "--chunker")
            from textblob.en import parse  # pattern's parser, bundled with TextBlob

            self._parse = parse
            self.backend = "textblob"

    def __call__(self, text: str, max_phrases: int) -> list[str]:
        words = text.split()
        if len(words) > MAX_CHUNK_WORDS:
            text = " ".join(words[:MAX_CHUNK_WORDS])
        if self._nlp is not None:
            chunks = [c.text for c in self._nlp(text).noun_chunks]
        else:
            chunks = self._textblob_chunks(text)
        out: list[str] = []
        for c in chunks:
            c = " ".join(c.split())
            if c and c.lower() not in {o.lower() for o in out}:
                out.append(c)
            if len(out) == max_phrases:
                break
        return out

    def _textblob_chunks(self, text: str) -> list[str]:
        # parse() tags each token word/POS/chunk/PNP; sentences are split by newlines,
        # tokens by spaces. A noun phrase starts at B-NP and continues through I-NP.
        tagged = self._parse(text.replace("\n", " "), chunks=True, relations=False, lemmata=False)
        chunks, cur = [], []
        for sentence in tagged.split("\n"):
            for token in sentence.split(" "):
                parts = token.split("/")  # word/POS/chunk/PNP; '/' in words is escaped
                if len(parts) < 4:
                    continue
                word, chunk = "/".join(parts[:-3]).replace("&slash;", "/"), parts[-2]
                if chunk == "B-NP" or (chunk == "I-NP" and not cur):
                    if cur:
                        chunks.append(" ".join(cur))
                    cur = [word]
                elif chunk == "I-NP":
                    cur.append(word)
                else:
                    if cur:
                        chunks.append(" ".join(cur))
                    cur = []
            if cur:
                chunks.append(" ".join(cur))
                cur = []
        return chunks

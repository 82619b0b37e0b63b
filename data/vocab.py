"""Token vocabulary, stored as JSON so that a vocabulary file is never code we execute."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from data.files import atomic_write

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
FORMAT_VERSION = 1


class VocabError(ValueError):
    """A vocabulary file that cannot be used; the message names the file and the problem."""


class Vocab:
    """Maps tokens to ids. Ids 0-3 are always `<pad> <s> </s> <unk>` so that checkpoints and
    data loaders can rely on `pad_id == 0` without carrying the vocabulary around."""

    def __init__(self, tokens: Sequence[str]):
        tokens = list(tokens)
        if tuple(tokens[:4]) != SPECIALS:
            raise VocabError(f"a vocabulary must start with {' '.join(SPECIALS)}")
        if len(set(tokens)) != len(tokens):
            dup = next(t for t, n in Counter(tokens).items() if n > 1)
            raise VocabError(f"duplicate token {dup!r} in vocabulary")
        self.tokens = tokens
        self.index = {t: i for i, t in enumerate(tokens)}

    pad_id, bos_id, eos_id, unk_id = 0, 1, 2, 3

    def __len__(self) -> int:
        return len(self.tokens)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.tokens == other.tokens

    def encode(self, formula: str | Sequence[str]) -> list[int]:
        """Token ids of a normalized formula, unknown tokens mapped to `<unk>`."""
        toks = formula.split() if isinstance(formula, str) else formula
        return [self.index.get(t, self.unk_id) for t in toks]

    def unknown(self, formula: str | Sequence[str]) -> list[str]:
        """The tokens of a formula this vocabulary lacks, so callers can refuse or report them."""
        toks = formula.split() if isinstance(formula, str) else formula
        return [t for t in toks if t not in self.index]

    def decode(self, ids: Iterable[int]) -> str:
        """A formula string from ids, stopping at `</s>` and skipping the other specials."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i in (self.pad_id, self.bos_id):
                continue
            out.append(self.tokens[i] if 0 <= i < len(self.tokens) else UNK)
        return " ".join(out)

    def extended(self, tokens: Iterable[str]) -> Vocab:
        """A new vocabulary with `tokens` appended (in first-seen order) and old ids unchanged,
        which is what lets a fine-tuned model keep its trained embedding rows."""
        new = list(self.tokens)
        seen = set(new)
        for t in tokens:
            if t not in seen:
                new.append(t)
                seen.add(t)
        return Vocab(new)

    @classmethod
    def build(cls, formulas: Iterable[str], min_count: int = 1) -> Vocab:
        """Tokens seen at least `min_count` times, most frequent first (ties alphabetical) so
        that the file is deterministic for a given corpus."""
        counts = Counter(t for f in formulas for t in f.split())
        kept = sorted((t for t, n in counts.items() if n >= min_count and t not in SPECIALS),
                      key=lambda t: (-counts[t], t))
        return cls(list(SPECIALS) + kept)

    def to_dict(self) -> dict:
        return {"version": FORMAT_VERSION, "tokens": list(self.tokens)}

    @classmethod
    def from_dict(cls, d: object, source: str = "vocabulary") -> Vocab:
        if not isinstance(d, dict) or not isinstance(d.get("tokens"), list):
            raise VocabError(f"{source}: expected a JSON object with a 'tokens' list")
        if d.get("version") != FORMAT_VERSION:
            raise VocabError(f"{source}: unsupported vocabulary version {d.get('version')!r}")
        toks = d["tokens"]
        bad = [t for t in toks if not isinstance(t, str) or not t or any(c.isspace() for c in t)]
        if bad:
            raise VocabError(f"{source}: invalid token {bad[0]!r} (tokens are non-empty and "
                             "contain no whitespace)")
        try:
            return cls(toks)
        except VocabError as e:
            raise VocabError(f"{source}: {e}") from None

    def save(self, path: str | Path) -> None:
        atomic_write(path, json.dumps(self.to_dict(), ensure_ascii=False, indent=0) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Vocab:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise VocabError(f"{path}: vocabulary file not found (run build_vocab.py)") from None
        except (OSError, UnicodeDecodeError) as e:
            raise VocabError(f"{path}: cannot read vocabulary: {e}") from None
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise VocabError(f"{path}: malformed JSON: {e}") from None
        return cls.from_dict(d, source=str(path))

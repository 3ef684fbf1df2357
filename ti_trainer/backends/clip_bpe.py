"""CLIP's byte-level BPE tokenizer, small enough to read, with a built-in tiny vocabulary.

Real checkpoints use the model's own tokenizer. The built-in tiny model needs a vocabulary that is made here
from a fixed word list (nothing is downloaded), and tests need one that behaves like CLIP's: lower-cased,
whitespace-normalised, words ending in `</w>`, ids `<|startoftext|>`/`<|endoftext|>` last, id 0 = "!".
"""

from __future__ import annotations

import functools
import html
import json
from collections import Counter
from pathlib import Path

import regex

_SPLIT = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
START, END = "<|startoftext|>", "<|endoftext|>"


@functools.lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """CLIP's reversible map from bytes to printable characters (so BPE never sees whitespace/control)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def clean_text(text: str) -> str:
    return " ".join(html.unescape(html.unescape(text)).split()).lower()


def _word_symbols(word: str) -> tuple[str, ...]:
    encoded = "".join(byte_to_unicode()[b] for b in word.encode("utf-8"))
    return tuple(encoded[:-1]) + (encoded[-1] + "</w>",)


class ClipBpeTokenizer:
    """`encode(text)` gives token ids without start/end tokens, like the WebUI's `tokenize`."""

    def __init__(self, merges: list[tuple[str, str]], encoder: dict[str, int] | None = None):
        if encoder is None:
            # CLIP's layout: bytes, bytes ending a word, one token per merge, then the two specials.
            base = list(byte_to_unicode().values())
            words = [symbol + "</w>" for symbol in base]
            vocab = base + words + ["".join(pair) for pair in merges] + [START, END]
            encoder = {token: index for index, token in enumerate(vocab)}
        self.encoder = dict(encoder)
        self.decoder = {index: token for token, index in self.encoder.items()}
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self._cache: dict[str, list[str]] = {}

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    @property
    def start_id(self) -> int:
        return self.encoder[START]

    @property
    def end_id(self) -> int:
        return self.encoder[END]

    @property
    def comma_id(self) -> int:
        return self.encoder[",</w>"]

    def encode(self, text: str) -> list[int]:
        ids = []
        for word in _SPLIT.findall(clean_text(text)):
            if word in (START, END):
                ids.append(self.encoder[word])
                continue
            ids.extend(self.encoder[symbol] for symbol in self._bpe(word))
        return ids

    def __call__(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def decode(self, ids: list[int]) -> str:
        to_byte = {char: byte for byte, char in byte_to_unicode().items()}
        text = "".join(self.decoder[i] for i in ids if i not in (self.start_id, self.end_id))
        data = bytearray()
        for piece in text.replace("</w>", " ").split(" "):
            data.extend(to_byte[c] for c in piece)
            data.extend(b" ")
        return data.decode("utf-8", errors="replace").strip()

    def _bpe(self, word: str) -> list[str]:
        if word in self._cache:
            return self._cache[word]
        symbols = list(_word_symbols(word))
        while len(symbols) > 1:
            pairs = {(symbols[i], symbols[i + 1]) for i in range(len(symbols) - 1)}
            best = min(pairs, key=lambda pair: self.ranks.get(pair, float("inf")))
            if best not in self.ranks:
                break
            symbols = merge_pair(symbols, best)
        self._cache[word] = symbols
        return symbols

    @classmethod
    def from_files(cls, vocab_json: Path, merges_txt: Path) -> ClipBpeTokenizer:
        """A model's own `vocab.json` + `merges.txt` (the layout diffusers/transformers save)."""
        encoder = json.loads(Path(vocab_json).read_text(encoding="utf-8"))
        lines = Path(merges_txt).read_text(encoding="utf-8").splitlines()
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        return cls([pair for pair in merges if len(pair) == 2], encoder)

    @classmethod
    def from_tokenizer_json(cls, path: Path) -> ClipBpeTokenizer:
        """The BPE model inside a `tokenizer.json` (what transformers 5 saves instead of the two files)."""
        model = json.loads(Path(path).read_text(encoding="utf-8"))["model"]
        merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        return cls([pair for pair in merges if len(pair) == 2], model["vocab"])

    def save_files(self, folder: Path) -> None:
        """Write `vocab.json` and `merges.txt` that transformers' CLIPTokenizer reads."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_text(json.dumps(self.encoder), encoding="utf-8")
        merges = sorted(self.ranks, key=self.ranks.get)
        lines = ["#version: 0.2"] + [" ".join(pair) for pair in merges]
        (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def merge_pair(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    """Join every adjacent occurrence of `pair`, left to right."""
    merged, i = [], 0
    while i < len(symbols):
        if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == pair:
            merged.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return merged


def learn_merges(words: list[str], max_merges: int) -> list[tuple[str, str]]:
    """Plain BPE training: repeatedly merge the most frequent adjacent pair (ties broken by the pair)."""
    corpus = Counter(_word_symbols(word) for text in words for word in _SPLIT.findall(clean_text(text)))
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs: Counter = Counter()
        for symbols, count in corpus.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best, frequency = min(pairs.items(), key=lambda item: (-item[1], item[0]))
        if frequency < 2:
            break
        merges.append(best)
        joined: Counter = Counter()
        for symbols, count in corpus.items():
            joined[tuple(merge_pair(list(symbols), best))] += count
        corpus = joined
    return merges


# Words the tiny vocabulary learns whole: prompt-template and caption words, so demo prompts tokenize into
# few tokens the way real prompts do with CLIP's 49k vocabulary.
TINY_CORPUS = """
a an the of in on at by with and or for to from art painting photo picture rendering drawing sketch illustration
style styled artwork image portrait landscape still life city modern fantasy creature sci-fi space scene street
car cars road tree trees house houses building sky cloud clouds sea water river mountain mountains field flower
flowers fruit bowl table woman man person people child dog cat bird horse light shadow night day morning evening
red orange yellow green blue purple pink brown black white gray grey gold silver dark bright warm cold soft
oil watercolor ink pencil charcoal digital texture brush strokes canvas paper detailed close-up cropped small big
large good nice beautiful clean weird cool one two three four five my your this that
square circle triangle stripes dots gradient pattern shape shapes colour color colours colors abstract
""".split()


@functools.lru_cache(maxsize=1)
def tiny_tokenizer() -> ClipBpeTokenizer:
    """A ~900-token CLIP-style vocabulary built from TINY_CORPUS; the same every time."""
    words = [word for word in TINY_CORPUS for _ in range(3)]
    return ClipBpeTokenizer(learn_merges(words, max_merges=400))

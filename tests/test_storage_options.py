"""`--storage-options` parsing (store/common.py) on every CLI, the run config's field, and secret redaction."""
from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.cli import parse_config
from pipelines.config import ExtractConfig
from store.common import REDACTED, ConfigError, parse_storage_options, redact_secrets

OPTS = {"key": "AKIA-ID", "secret": "s3cr3t", "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000",
                                                                "aws_session_token": "tok"}, "anon": False}


def test_parse_json_file_and_mapping(tmp_path: Path) -> None:
    import json

    text = json.dumps(OPTS)
    assert parse_storage_options(text, "--storage-options") == OPTS
    (tmp_path / "o.yaml").write_text("key: AKIA-ID\nclient_kwargs: {endpoint_url: 'http://h:1'}\n")
    assert parse_storage_options(str(tmp_path / "o.yaml"), "x") == {"key": "AKIA-ID",
                                                                   "client_kwargs": {"endpoint_url": "http://h:1"}}
    assert parse_storage_options(None, "x") == {} and parse_storage_options(OPTS, "x") == OPTS


@pytest.mark.parametrize("value, match", [
    ("{nope", r"--storage-options: storage options are not valid JSON"),
    ("[1, 2]", r"--storage-options: config file '\[1, 2\]' does not exist"),
    (3, r"--storage-options: storage options must be a mapping, got int"),
])
def test_bad_options_name_the_flag(value: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_storage_options(value, "--storage-options")  # type: ignore[arg-type]


def test_a_file_that_holds_no_mapping_is_named(tmp_path: Path) -> None:
    (tmp_path / "o.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match=r"o\.yaml' must hold a mapping"):
        parse_storage_options(str(tmp_path / "o.yaml"), "--storage-options")


def test_redaction_hides_every_credential_at_any_depth() -> None:
    red = redact_secrets(OPTS)
    assert red == {"key": REDACTED, "secret": REDACTED, "anon": False,
                   "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000", "aws_session_token": REDACTED}}
    assert OPTS["secret"] == "s3cr3t"  # the caller's mapping is untouched


def test_extract_config_takes_the_flag_or_yaml_and_never_shows_secrets(tmp_path: Path) -> None:
    import json

    cfg = parse_config(["data/", "--store", "s3://b/s.zarr", "--storage-options", json.dumps(OPTS)])
    assert cfg.storage_options == OPTS
    assert "s3cr3t" not in repr(cfg) and "tok" not in repr(cfg) and "AKIA" not in repr(cfg)
    saved = cfg.to_yaml()
    assert "s3cr3t" not in saved and "AKIA" not in saved and "endpoint_url: http://127.0.0.1:9000" in saved
    (tmp_path / "run.yaml").write_text(f"source: data/\nstore: s3://b/s.zarr\nstorage_options: {json.dumps(OPTS)}\n")
    assert parse_config(["--config", str(tmp_path / "run.yaml")]).storage_options == OPTS
    with pytest.raises(ConfigError, match=r"command line: storage_options: storage options are not valid JSON"):
        parse_config(["data/", "--store", "s3://b/s.zarr", "--storage-options", "{x"])
    assert ExtractConfig().storage_options == {}


def test_train_and_store_cli_refuse_bad_options_with_exit_2(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from train.cli import main as train_main

    assert train_main(["mee", "--store", str(tmp_path / "s.zarr"), "--out", str(tmp_path / "r"),
                       "--storage-options", "{x"]) == 2
    assert "--storage-options: storage options are not valid JSON" in capsys.readouterr().err

"""``[destinations.auth]``: each bad value is a ConfigError naming its key, secrets are read
from the environment or a file and appear in no message or repr, and a secret that cannot be
read stops start-up before anything listens."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from scp_node.app import Stage, run_node
from scp_node.cli import app as cli
from scp_node.dicom.webauth import BearerAuth, ClientCredentialsAuth, read_secret, web_session
from scp_node.errors import ConfigError
from scp_node.settings import Destination, TlsSection, load_settings

URL = "https://pacs.example/dicom-web"
BASIC: dict[str, Any] = {"kind": "basic", "username": "node", "password_env": "PACS_PASSWORD"}
OAUTH2: dict[str, Any] = {
    "kind": "oauth2",
    "token_url": "https://idp.example/token",
    "client_id": "scp-node",
    "client_secret_file": "/run/secrets/client",
}


def _web(auth: dict[str, Any] | None, **extra: Any) -> dict[str, Any]:
    values: dict[str, Any] = {"name": "web", "kind": "dicomweb", "url": URL, **extra}
    if auth is not None:
        values["auth"] = auth
    return values


def _load(destination: dict[str, Any]) -> None:
    load_settings(overrides={"destinations": [destination]})


def test_each_kind_takes_its_keys() -> None:
    for auth in (BASIC, {"kind": "bearer", "token_file": "/run/t"}, {**OAUTH2, "scope": "a b"}):
        (web,) = load_settings(overrides={"destinations": [_web(auth)]}).destinations
        assert web.auth is not None and web.auth.kind == auth["kind"]
    (web,) = load_settings(overrides={"destinations": [_web(None)]}).destinations
    assert web.auth is None  # anonymous, as before


@pytest.mark.parametrize(
    ("destination", "message"),
    [
        (
            _web({**BASIC, "password": "hunter2"}),
            r"destinations\.0\.auth\.password: .*inline secrets are not accepted: use "
            r"password_env or password_file",
        ),
        (
            _web({"kind": "bearer", "token": "abc"}),
            r"destinations\.0\.auth\.token: .*inline secrets",
        ),
        (
            _web({**OAUTH2, "client_secret": "abc"}),
            r"destinations\.0\.auth\.client_secret: .*inline secrets",
        ),
        (
            _web({"kind": "basic", "password_env": "P"}),
            r"destinations\.0\.auth\.username: .*required for auth\.kind = 'basic'",
        ),
        (
            _web({**BASIC, "password_file": "/run/p"}),
            r"destinations\.0\.auth\.password_env: .*exactly one of password_env and "
            r"password_file",
        ),
        (
            _web({"kind": "bearer"}),
            r"destinations\.0\.auth\.token_env: .*exactly one",
        ),
        (
            _web({"kind": "bearer", "token_env": "T", "scope": "x"}),
            r"destinations\.0\.auth\.scope: .*not used with auth\.kind = 'bearer'",
        ),
        (
            _web({**BASIC, "client_auth": "body"}),
            r"destinations\.0\.auth\.client_auth: .*not used",
        ),
        (
            _web({k: v for k, v in OAUTH2.items() if k != "token_url"}),
            r"destinations\.0\.auth\.token_url: .*required",
        ),
        (
            _web({**OAUTH2, "token_url": "https://id:secret@idp.example/token"}),
            r"destinations\.0\.auth\.token_url",
        ),
        (_web({**BASIC, "password_env": "NOT-A-NAME"}), r"destinations\.0\.auth\.password_env"),
        (_web({"kind": "digest"}), r"destinations\.0\.auth\.kind"),
        (
            {"name": "pacs", "ae_title": "PACS", "host": "h", "port": 104, "auth": BASIC},
            r"destinations\.0\.auth: .*only used with kind = \"dicomweb\"",
        ),
        (
            _web(None, url="https://node:hunter2@pacs.example/dicom-web"),
            r"destinations\.0\.url: .*credentials do not go in url",
        ),
    ],
)
def test_bad_auth_names_the_key(destination: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        _load(destination)
    assert "hunter2" not in str(caught.value)


def test_secret_from_environment_or_file(tmp_path: Path) -> None:
    where = "destinations.web.auth"
    assert read_secret(where, "password", "PW", None, {"PW": "s3cret"}) == "s3cret"
    path = tmp_path / "secret"
    path.write_text("s3cret\n")  # editors and `echo` add a line break
    assert read_secret(where, "password", None, path, {}) == "s3cret"

    with pytest.raises(ConfigError, match=r"web\.auth\.password_env: .* PW is not set"):
        read_secret(where, "password", "PW", None, {})
    with pytest.raises(ConfigError, match=r"web\.auth\.password_env"):
        read_secret(where, "password", "PW", None, {"PW": ""})
    with pytest.raises(ConfigError, match=r"web\.auth\.token_file: cannot read .*missing"):
        read_secret(where, "token", None, tmp_path / "missing", {})
    path.write_text("\n")
    with pytest.raises(ConfigError, match=r"web\.auth\.token_file: .* is empty"):
        read_secret(where, "token", None, path, {})


def test_sessions_carry_the_credentials_and_hide_them(tmp_path: Path) -> None:
    basic = Destination.model_validate(_web(BASIC))
    session = web_session(basic, TlsSection(), {"PACS_PASSWORD": "s3cret"})
    assert session.auth is not None and "s3cret" not in repr(session.auth)

    bearer = Destination.model_validate(_web({"kind": "bearer", "token_env": "T"}))
    auth = web_session(bearer, TlsSection(), {"T": "tok-123"}).auth
    assert isinstance(auth, BearerAuth) and "tok-123" not in repr(auth)

    path = tmp_path / "client"
    path.write_text("client-s3cret")
    oauth = Destination.model_validate(_web({**OAUTH2, "client_secret_file": str(path)}))
    auth = web_session(oauth, TlsSection(), {}).auth
    assert isinstance(auth, ClientCredentialsAuth) and "client-s3cret" not in repr(auth)

    anonymous = Destination.model_validate(_web(None))
    assert web_session(anonymous, TlsSection(), {}).auth is None


def test_credentials_over_plain_http_off_loopback_are_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    environ = {"PACS_PASSWORD": "s3cret"}
    with caplog.at_level(logging.WARNING, logger="scp_node.dicom.webauth"):
        web_session(Destination.model_validate(_web(BASIC)), TlsSection(), environ)
        local = _web(BASIC, url="http://127.0.0.1:8042/dicom-web")
        web_session(Destination.model_validate(local), TlsSection(), environ)
        assert not caplog.records
        remote = _web(BASIC, url="http://pacs.example:8042/dicom-web")
        web_session(Destination.model_validate(remote), TlsSection(), environ)
    (record,) = caplog.records
    assert "plain http" in record.getMessage() and "s3cret" not in record.getMessage()


def test_an_unreadable_secret_stops_start_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PACS_PASSWORD", raising=False)
    settings = load_settings(
        overrides={
            "database": {"url": f"sqlite:///{tmp_path / 'node.db'}"},
            "web": {"enabled": False},
            "destinations": [_web(BASIC)],
        }
    )
    with pytest.raises(ConfigError, match=r"destinations\.web\.auth\.password_env"):
        run_node(settings, {Stage.DISPATCH}, install_signals=False)
    assert not (tmp_path / "node.db").exists()  # nothing was started

    config = tmp_path / "config.toml"
    config.write_text(
        f"[database]\nurl = 'sqlite:///{tmp_path / 'node.db'}'\n"
        f"[log]\ndir = '{tmp_path / 'log'}'\n[web]\nenabled = false\n"
        "[[destinations]]\nname = 'web'\nkind = 'dicomweb'\n"
        f"url = '{URL}'\nauth.kind = 'basic'\nauth.username = 'node'\n"
        "auth.password_env = 'PACS_PASSWORD'\n"
    )
    result = CliRunner().invoke(cli, ["dispatch", "--config", str(config)])
    assert result.exit_code == 2
    assert "environment variable PACS_PASSWORD is not set" in result.output

"""``[tls]``, ``node.allowed_source_ips`` and ``destinations.tls``: each bad value is a
ConfigError that names its key."""

from __future__ import annotations

from typing import Any

import pytest

from scp_node.errors import ConfigError
from scp_node.settings import load_settings

PACS: dict[str, Any] = {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}


def test_defaults_are_plain_and_open() -> None:
    settings = load_settings()
    assert not settings.tls.enabled and settings.tls.check_hostname
    assert settings.node.allowed_source_ips == []


def test_source_ips_are_normalised_networks() -> None:
    node = load_settings(overrides={"node": {"allowed_source_ips": ["127.0.0.1", "10.1.2.3/8"]}})
    assert node.node.allowed_source_ips == ["127.0.0.1/32", "10.0.0.0/8"]
    with pytest.raises(ConfigError, match=r"node\.allowed_source_ips"):
        load_settings(overrides={"node": {"allowed_source_ips": ["10.0.0.0/40"]}})


@pytest.mark.parametrize(
    ("tls", "key"),
    [
        ({"enabled": True}, "tls.cert_file"),
        ({"enabled": True, "cert_file": "a.crt"}, "tls.key_file"),
        ({"require_client_cert": True, "cert_file": "a", "key_file": "b"}, "tls.ca_file"),
        ({"cert_file": "a.crt"}, "tls.key_file"),
    ],
)
def test_incomplete_tls_names_the_missing_key(tls: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_settings(overrides={"tls": tls})


def test_destination_tls_is_for_dimse_only() -> None:
    settings = load_settings(overrides={"destinations": [{**PACS, "tls": True}]})
    assert settings.destinations[0].tls
    web = {"name": "web", "kind": "dicomweb", "url": "https://pacs/dicom-web", "tls": True}
    with pytest.raises(ConfigError, match=r"destinations\.0\.tls"):
        load_settings(overrides={"destinations": [web]})

"""Configuration: the shipped config.toml, precedence, and errors that name the key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from scp_node.errors import ConfigError
from scp_node.settings import load_settings
from tests.conftest import REPO_ROOT


def test_shipped_config_loads_with_the_documented_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("SCP_NODE_")]:
        monkeypatch.delenv(key)
    settings = load_settings(REPO_ROOT / "config.toml")
    assert settings.node.ae_title == "SCPNODE"
    assert settings.node.port == 11112
    assert settings.settle.quiet_s == 10
    assert settings.database.url.startswith("sqlite:///var/")
    assert settings.worker.model == "ct-abdomen"
    assert [d.name for d in settings.destinations] == ["pacs"]
    assert (settings.destinations[0].supersede, settings.destinations[0].verify) == ("none", False)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_precedence_cli_over_env_over_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path, "[node]\nport = 1000\nae_title = 'FROMFILE'\n[settle]\nquiet_s = 3\n")
    assert load_settings(path).node.port == 1000
    monkeypatch.setenv("SCP_NODE_NODE__PORT", "2000")
    settings = load_settings(path)
    assert settings.node.port == 2000
    assert settings.node.ae_title == "FROMFILE"  # untouched keys keep the file's value
    assert settings.settle.quiet_s == 3
    assert load_settings(path, {"node": {"port": 3000}}).node.port == 3000


def test_destinations_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "SCP_NODE_DESTINATIONS", '[{"name": "a", "ae_title": "PACS", "host": "h", "port": 104}]'
    )
    (dest,) = load_settings(None).destinations
    assert (dest.ae_title, dest.port) == ("PACS", 104)


def test_worker_models_list_and_the_one_model_shorthand(tmp_path: Path) -> None:
    assert load_settings(_write(tmp_path, "")).worker.models == ("ct-abdomen",)
    one = load_settings(_write(tmp_path, "[worker]\nmodel = 'liver'\n")).worker
    assert (one.model, one.models) == ("liver", ("liver",))
    many = load_settings(_write(tmp_path, "[worker]\nmodels = ['a', 'b']\n")).worker
    assert (many.model, many.models, many.max_loaded_models) == ("a", ("a", "b"), 2)
    both = load_settings(_write(tmp_path, "[worker]\nmodel = 'b'\nmodels = ['a', 'b']\n"))
    assert both.worker.models == ("a", "b")
    with pytest.raises(ConfigError, match=r"worker\.model 'c' is not in worker\.models"):
        load_settings(_write(tmp_path, "[worker]\nmodel = 'c'\nmodels = ['a', 'b']\n"))


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[node]\nport = 70000\n", "node.port"),
        ("[node]\nae_title = 'WAY_TOO_LONG_AE_TITLE'\n", "node.ae_title"),
        ("[worker]\ndevice = 'tpu'\n", "worker.device"),
        ("[settle]\nquiet_s = -1\n", "settle.quiet_s"),
        ("[node]\nnot_a_key = 1\n", "node.not_a_key"),
        ("[[destinations]]\nname = 'x'\nae_title = 'A'\nhost = 'h'\n", "destinations.0.port"),
    ],
)
def test_bad_value_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_settings(_write(tmp_path, text))


def test_bad_environment_value_names_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCP_NODE_NODE__PORT", "eleven")
    with pytest.raises(ConfigError, match=r"node\.port"):
        load_settings(None)


def test_missing_or_broken_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(_write(tmp_path, "[node\nport = 1"))


def test_destination_supersede_and_verify(tmp_path: Path) -> None:
    base = "[[destinations]]\nname = 'x'\nae_title = 'A'\nhost = 'h'\nport = 104\n"
    (dest,) = load_settings(_write(tmp_path, base)).destinations
    assert (dest.supersede, dest.verify) == ("none", False)
    text = base + "supersede = 'iocm'\nverify = true\n"
    (dest,) = load_settings(_write(tmp_path, text)).destinations
    assert (dest.supersede, dest.verify) == ("iocm", True)
    web = "[[destinations]]\nname = 'w'\nkind = 'dicomweb'\nurl = 'http://h/dicom-web'\n"
    (dest,) = load_settings(_write(tmp_path, web + "verify = true\n")).destinations
    assert dest.verify
    with pytest.raises(ConfigError, match=r"destinations\.0\.supersede"):
        load_settings(_write(tmp_path, base + "supersede = 'delete'\n"))


def test_destination_outputs_and_seg_type(tmp_path: Path) -> None:
    base = "[[destinations]]\nname = 'x'\nae_title = 'A'\nhost = 'h'\nport = 104\n"
    (dest,) = load_settings(_write(tmp_path, base)).destinations
    assert (dest.outputs, dest.seg_type) == (("seg",), "binary")
    text = base + "outputs = ['seg', 'sr']\nseg_type = 'labelmap'\n"
    (dest,) = load_settings(_write(tmp_path, text)).destinations
    assert (dest.outputs, dest.seg_type) == (("seg", "sr"), "labelmap")
    (dest,) = load_settings(_write(tmp_path, base + "outputs = ['sr']\n")).destinations
    assert dest.outputs == ("sr",)
    (dest,) = load_settings(_write(tmp_path, base + "outputs = ['seg', 'sc']\n")).destinations
    assert dest.outputs == ("seg", "sc")
    refused = {
        "outputs = ['seg', 'pdf']": r"destinations\.0\.outputs",
        "outputs = []": "at most once",
        "outputs = ['seg', 'seg']": "at most once",
        "seg_type = 'fractional'": r"destinations\.0\.seg_type",
        "seg_type = 'labelmap'\nsupersede = 'iocm'": "cannot be combined",
    }
    for line, message in refused.items():
        with pytest.raises(ConfigError, match=message):
            load_settings(_write(tmp_path, base + line + "\n"))

"""Docker cannot run on the build machines: parse the Docker files and check that every path
and command they name exists in the repository and that their settings load."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from scp_node.cli import app
from scp_node.settings import NodeSection, WebSection, load_settings
from tests.conftest import REPO_ROOT

DOCKER = REPO_ROOT / "docker"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.cuda"]


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    assert not pending, f"{path.name}: dangling line continuation"
    out = []
    for line in lines:
        keyword, _, args = line.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def _exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def _cli_commands() -> set[str]:
    names = {c.name or (c.callback.__name__ if c.callback else "") for c in app.registered_commands}
    names |= {g.name or "" for g in app.registered_groups}
    return names


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_names_only_what_exists(dockerfile: Path) -> None:
    instructions = _instructions(dockerfile)
    keywords = [k for k, _ in instructions]
    assert keywords[0] == "FROM"
    known = {
        "FROM", "ENV", "RUN", "WORKDIR", "COPY", "USER", "VOLUME", "EXPOSE", "HEALTHCHECK",
        "ENTRYPOINT", "CMD", "ARG", "LABEL",
    }  # fmt: skip
    assert set(keywords) <= known, set(keywords) - known

    copied: dict[str, str] = {}  # destination in the image -> source in the repository
    workdir = "/"
    for keyword, args in instructions:
        if keyword == "WORKDIR":
            workdir = args
        if keyword == "COPY":
            *sources, dest = shlex.split(args)
            for source in sources:
                assert (REPO_ROOT / source).exists(), f"{dockerfile.name}: COPY {source} missing"
                target = str(Path(workdir) / dest)
                copied[str(Path(target) / source) if dest.endswith("/") else target] = source
    assert copied["/usr/local/bin/scp-node-entrypoint"] == "docker/entrypoint.sh"
    assert {"pyproject.toml", "scp_node", "models"} <= set(copied.values())

    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    torch_pin = next(d for d in pyproject["project"]["dependencies"] if d.startswith("torch"))
    runs = " ".join(args for keyword, args in instructions if keyword == "RUN")
    assert "pip install --index-url https://download.pytorch.org/whl/" in runs
    assert torch_pin in runs, f"{dockerfile.name} must install {torch_pin}"

    (entrypoint,) = [_exec_form(a) for k, a in instructions if k == "ENTRYPOINT"]
    (cmd,) = [_exec_form(a) for k, a in instructions if k == "CMD"]
    assert entrypoint == ["scp-node-entrypoint"]
    assert cmd[0] in _cli_commands()
    config = cmd[cmd.index("--config") + 1]
    assert copied[config] == "config.toml"
    load_settings(REPO_ROOT / "config.toml")  # the image's configuration loads

    exposed = {int(p) for k, a in instructions if k == "EXPOSE" for p in a.split()}
    assert exposed == {NodeSection().port, WebSection().port}
    (health,) = [a for k, a in instructions if k == "HEALTHCHECK"]
    assert f"http://127.0.0.1:{WebSection().port}/healthz" in health
    env = " ".join(a for k, a in instructions if k == "ENV")
    assert "SCP_NODE_WEB__HOST=0.0.0.0" in env


def test_both_images_share_the_entrypoint() -> None:
    cpu, cuda = (
        [(k, a) for k, a in _instructions(p) if k in ("ENTRYPOINT", "CMD")] for p in DOCKERFILES
    )
    assert cpu == cuda
    assert "cuda" in _instructions(DOCKERFILES[1])[0][1]


def test_entrypoint_script_runs_existing_commands() -> None:
    script = (DOCKER / "entrypoint.sh").read_text()
    assert script.startswith("#!/bin/sh\n")
    assert (DOCKER / "entrypoint.sh").stat().st_mode & 0o111
    calls = re.findall(r"^\s*(?:exec\s+)?scp-node\s+(\S+)(?:\s+(\S+))?", script, re.M)
    assert ("db", "upgrade") in calls
    groups = {g.name: g.typer_instance for g in app.registered_groups}
    db_commands = {c.name or c.callback.__name__ for c in groups["db"].registered_commands}  # type: ignore[union-attr]
    assert "upgrade" in db_commands


def _compose() -> dict[str, Any]:
    data = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    assert isinstance(data, dict)
    return data


def test_compose_services_build_and_health_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    compose = _compose()
    services = compose["services"]
    assert set(services) == {"node", "orthanc", "db"}
    node = services["node"]
    context = (DOCKER / node["build"]["context"]).resolve()
    assert context == REPO_ROOT
    assert (context / node["build"]["dockerfile"]).is_file()
    assert set(node["depends_on"]) <= set(services)
    assert "/healthz" in " ".join(node["healthcheck"]["test"])
    for volume in (v.split(":")[0] for s in services.values() for v in s.get("volumes", [])):
        assert volume in compose["volumes"], f"undeclared volume {volume}"

    # The node's environment must load as settings (every key real, every value valid).
    for key, value in node["environment"].items():
        resolved = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(value))
        monkeypatch.setenv(key, resolved)
    settings = load_settings(REPO_ROOT / "config.toml")
    assert settings.database.url.startswith("postgresql+psycopg://")
    db_env = services["db"]["environment"]
    assert f"{db_env['POSTGRES_USER']}:{db_env['POSTGRES_PASSWORD']}@db:5432/" in (
        settings.database.url
    )
    (destination,) = settings.destinations
    assert destination.host == "orthanc"
    assert f"{destination.port}:{destination.port}" in services["orthanc"]["ports"][0]
    assert settings.web.token is not None
    modalities = json.loads(services["orthanc"]["environment"]["ORTHANC__DICOM_MODALITIES"])
    assert modalities["node"] == [settings.node.ae_title, "node", settings.node.port]

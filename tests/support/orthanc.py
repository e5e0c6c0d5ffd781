"""Orthanc (Debian package) as the PACS in tests: a generated config on private loopback ports.

The process gets ``TCP_NODELAY=1`` in its environment: Debian's Orthanc (dcmtk underneath)
otherwise leaves Nagle's algorithm on and stalls ~40 ms per instance. It is ready when
``GET /system`` answers. Only the DICOMweb plugin is loaded (never the GDCM plugin, which
crashed here once).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.net import free_port

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def orthanc_config(
    root: Path,
    *,
    http_port: int,
    dicom_port: int,
    ae_title: str,
    modalities: Mapping[str, tuple[str, str, int]],
    users: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The Orthanc configuration the tests use (also quoted in the README).

    Parameters
    ----------
    root
        Folder for Orthanc's storage and index (a temp dir).
    http_port, dicom_port
        Loopback ports for REST/DICOMweb and for DICOM.
    ae_title
        Orthanc's own AE title.
    modalities
        Name -> (AE title, host, port) of DICOM nodes Orthanc may send to and that may
        query it (C-FIND is refused to AEs not listed here).
    users
        User name -> password: HTTP basic authentication is then required on every
        REST and DICOMweb request, also from loopback.
    """
    config = {
        "Name": "scp-node-test",
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": ae_title,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "index"),
        "DicomModalities": {name: list(peer) for name, peer in modalities.items()},
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        # A DIMSE association to a slow peer (the node runs inference) must not time out.
        "DicomScuTimeout": 120,
        "HttpTimeout": 120,
        "StableAge": 1,
    }
    if users:
        config |= {"AuthenticationEnabled": True, "RegisteredUsers": dict(users)}
    return config


@dataclass
class OrthancServer:
    """A running Orthanc on 127.0.0.1 and a small REST client for it."""

    root: Path
    modalities: dict[str, tuple[str, str, int]]
    ae_title: str = "ORTHANC"
    http_port: int = field(default_factory=free_port)
    dicom_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    #: Registered users (name -> password); when set, this client logs in as the first.
    users: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """The REST root, e.g. ``http://127.0.0.1:8042``."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb root (QIDO/WADO/STOW)."""
        return f"{self.url}/dicom-web"

    @property
    def config_path(self) -> Path:
        return self.root / "orthanc.json"

    @property
    def log_path(self) -> Path:
        return self.root / "orthanc.log"

    def config(self) -> dict[str, Any]:
        return orthanc_config(
            self.root,
            http_port=self.http_port,
            dicom_port=self.dicom_port,
            ae_title=self.ae_title,
            modalities=self.modalities,
            users=self.users,
        )

    def start(self, timeout_s: float = 60.0) -> OrthancServer:
        """Write the config, start Orthanc and wait until ``GET /system`` answers."""
        if not DICOMWEB_PLUGIN.is_file():
            raise FileNotFoundError(f"{DICOMWEB_PLUGIN} missing: run `make peers`")
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [ORTHANC, str(self.config_path)],
                cwd=self.root,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "TCP_NODELAY": "1"},
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited:\n{self.log_path.read_text()[-4000:]}")
            try:
                self.get("/system")
                return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"Orthanc not ready after {timeout_s}s")

    def stop(self) -> None:
        """Stop Orthanc (SIGTERM, then SIGKILL after 30 s)."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def request(
        self, method: str, path: str, body: bytes | None = None, content_type: str | None = None
    ) -> bytes:
        """One HTTP request to Orthanc; raises ``urllib.error.HTTPError`` on 4xx/5xx."""
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if content_type is not None:
            req.add_header("Content-Type", content_type)
        if self.users:
            user, password = next(iter(self.users.items()))
            credentials = base64.b64encode(f"{user}:{password}".encode()).decode()
            req.add_header("Authorization", f"Basic {credentials}")
        with urllib.request.urlopen(req, timeout=180) as response:
            return bytes(response.read())

    def get(self, path: str) -> Any:
        return json.loads(self.request("GET", path))

    def post(self, path: str, payload: Any) -> Any:
        data = self.request("POST", path, json.dumps(payload).encode(), "application/json")
        return json.loads(data) if data else None

    def upload(self, path: Path) -> dict[str, Any]:
        """``POST /instances`` with a file's bytes; Orthanc's answer (has ``ParentStudy``)."""
        answer = self.request("POST", "/instances", path.read_bytes(), "application/dicom")
        return dict(json.loads(answer))

    def send_to_modality(self, modality: str, resources: list[str]) -> Any:
        """Ask Orthanc to C-STORE ``resources`` to a modality of its config (synchronously)."""
        return self.post(
            f"/modalities/{modality}/store", {"Resources": resources, "Synchronous": True}
        )

    def study_series(self, study_id: str) -> list[dict[str, Any]]:
        """The series of an Orthanc study (expanded)."""
        return list(self.get(f"/studies/{study_id}/series"))

    def series_instances(self, series_id: str) -> list[dict[str, Any]]:
        """The instances of an Orthanc series (expanded)."""
        return list(self.get(f"/series/{series_id}/instances"))

    def instance_file(self, instance_id: str) -> bytes:
        """The stored DICOM file of an instance."""
        return self.request("GET", f"/instances/{instance_id}/file")

    def http_error(self, exc: urllib.error.HTTPError) -> str:
        """Text of an HTTP error's body, for assertion messages."""
        return f"{exc.code}: {exc.read().decode(errors='replace')}"

"""The OHIF viewer against Orthanc, and headless Chromium to look at it.

``OhifSite`` serves the prebuilt OHIF site (``make ohif`` puts it in ``.cache/ohif``) and
proxies ``/dicom-web`` and ``/wado`` to Orthanc from the same origin, because Orthanc 1.10
sends no CORS headers. Its ``app-config.js`` is generated (the cached copy is not touched).

``Chromium`` runs Debian's ``chromium`` headless and speaks the Chrome DevTools Protocol
over ``--remote-debugging-pipe`` (file descriptors 3 and 4): no extra package, no port.
"""

from __future__ import annotations

import base64
import contextlib
import json
import mimetypes
import os
import queue
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.conftest import REPO_ROOT

OHIF_DIST = REPO_ROOT / ".cache" / "ohif" / "package" / "dist"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
#: Headless Chromium as root on a machine without outside network (see PEERS.md).
HEADLESS_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
CHROMIUM_FLAGS = [*HEADLESS_FLAGS, "--window-size=1400,900"]

APP_CONFIG = """window.config = {
  routerBasename: '/',
  extensions: [],
  modes: [],
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  showErrorDetails: 'always',
  investigationalUseDialog: { option: 'never' },
  disableConfirmationPrompts: true,
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {
        friendlyName: 'Orthanc (test)',
        name: 'orthanc',
        wadoUriRoot: '/wado',
        qidoRoot: '/dicom-web',
        wadoRoot: '/dicom-web',
        qidoSupportsIncludeField: false,
        supportsReject: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        omitQuotationForMultipartRequest: true,
        singlepart: 'bulkdata,video',
        bulkDataURI: { enabled: true, relativeResolution: 'studies' },
      },
    },
  ],
};
"""


class OhifSite:
    """OHIF's static files plus a same-origin proxy to Orthanc, on a loopback port."""

    def __init__(self, orthanc_url: str, dist: Path = OHIF_DIST) -> None:
        if not (dist / "index.html").is_file():
            raise FileNotFoundError(f"OHIF missing in {dist}: run `make ohif`")
        self.dist = dist.resolve()
        self.orthanc_url = orthanc_url
        self.requests: list[tuple[str, int]] = []
        site = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet: requests are kept in ``site.requests`` instead."""

            def do_GET(self) -> None:
                site.handle(self, "GET")

            def do_POST(self) -> None:
                site.handle(self, "POST")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> OhifSite:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _reply(self, h: BaseHTTPRequestHandler, status: int, body: bytes, ctype: str) -> None:
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)
        self.requests.append((h.path, status))

    def handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        """Proxy DICOMweb/WADO-URI to Orthanc; serve the site (SPA routes get index.html)."""
        path = h.path.split("?", 1)[0]
        if path.startswith(("/dicom-web/", "/wado")):
            self._proxy(h, method)
        elif path == "/app-config.js":
            self._reply(h, 200, APP_CONFIG.encode(), "application/javascript")
        else:
            target = (self.dist / path.lstrip("/")).resolve()
            if not target.is_file() or self.dist not in target.parents:
                target = self.dist / "index.html"
            ctype = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
            if target.suffix == ".wasm":
                ctype = "application/wasm"
            self._reply(h, 200, target.read_bytes(), ctype)

    def _proxy(self, h: BaseHTTPRequestHandler, method: str) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else None
        request = urllib.request.Request(self.orthanc_url + h.path, data=body, method=method)
        for key in ("Accept", "Content-Type"):
            if h.headers.get(key):
                request.add_header(key, h.headers[key])
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                data, status = response.read(), response.status
                ctype = response.headers.get("Content-Type", "application/octet-stream")
        except urllib.error.HTTPError as exc:
            data, status = exc.read(), exc.code
            ctype = exc.headers.get("Content-Type", "text/plain")
        self._reply(h, status, data, ctype)


class CdpError(RuntimeError):
    """Chromium answered a DevTools command with an error."""


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe; one page."""

    def __init__(self, user_data_dir: Path) -> None:
        user_data_dir.mkdir(parents=True, exist_ok=True)
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        self.log_path = user_data_dir.parent / "chromium.log"
        # Chromium reads commands on fd 3 and writes answers on fd 4; the shell puts the
        # pipe ends there, so no preexec_fn is needed. bash, not sh: dash refuses to
        # redirect from a descriptor above 9 ("Bad fd number"), which pytest often hands us.
        command = " ".join(
            [
                CHROMIUM,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={user_data_dir}",
                "--remote-debugging-pipe",
                "about:blank",
                '3<&"$0"',
                '4>&"$1"',
            ]
        )
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                ["bash", "-c", f"exec {command}", str(to_child_r), str(from_child_w)],
                pass_fds=(to_child_r, from_child_w),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        os.close(to_child_r)
        os.close(from_child_w)
        self._next_id = 0
        self._lock = threading.Lock()
        self._waiting: dict[int, queue.Queue[dict[str, Any]]] = {}
        self.events: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.session: str | None = None

    def _read(self) -> None:
        buffer = b""
        while True:
            chunk = os.read(self._from_child, 1 << 16)
            if not chunk:
                return
            buffer += chunk
            while b"\0" in buffer:
                raw, buffer = buffer.split(b"\0", 1)
                message = json.loads(raw)
                if "id" in message and message["id"] in self._waiting:
                    self._waiting[message["id"]].put(message)
                else:
                    self.events.append(message)

    def send(self, method: str, timeout_s: float = 60.0, **params: Any) -> dict[str, Any]:
        """One DevTools command (to the page session once attached); returns its result."""
        with self._lock:
            self._next_id += 1
            ident = self._next_id
            box: queue.Queue[dict[str, Any]] = queue.Queue()
            self._waiting[ident] = box
        message: dict[str, Any] = {"id": ident, "method": method, "params": params}
        if self.session is not None and not method.startswith("Target."):
            message["sessionId"] = self.session
        os.write(self._to_child, json.dumps(message).encode() + b"\0")
        try:
            answer = box.get(timeout=timeout_s)
        except queue.Empty:
            raise TimeoutError(f"no answer to {method} in {timeout_s}s") from None
        finally:
            self._waiting.pop(ident, None)
        if "error" in answer:
            raise CdpError(f"{method}: {answer['error']}")
        return dict(answer.get("result", {}))

    def open_page(self, width: int = 1400, height: int = 900) -> None:
        """Create a page, attach to it, and turn on the events the checks read."""
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]
        for domain in ("Page.enable", "Runtime.enable", "Log.enable"):
            self.send(domain)
        self.send(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )

    def add_init_script(self, source: str) -> None:
        """Run ``source`` in every new document before the page's own scripts."""
        self.send("Page.addScriptToEvaluateOnNewDocument", source=source)

    def navigate(self, url: str) -> None:
        self.send("Page.navigate", url=url)

    def evaluate(self, expression: str) -> Any:
        """Evaluate JavaScript in the page (promises awaited); returns the value."""
        result = self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise CdpError(f"{expression[:80]}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float, what: str, poll_s: float = 0.5) -> Any:
        """Poll a JavaScript expression until it is truthy."""
        deadline = time.monotonic() + timeout_s
        value: Any = None
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(poll_s)
        raise TimeoutError(f"timed out after {timeout_s}s waiting for {what} (last: {value!r})")

    def click(self, selector_js: str, clicks: int = 1) -> None:
        """Click (``clicks`` = 2: double-click) the middle of the element ``selector_js``
        (a JavaScript expression giving an Element) with real input events."""
        box = self.evaluate(
            f"(() => {{ const e = {selector_js}; if (!e) return null; e.scrollIntoView();"
            " const r = e.getBoundingClientRect();"
            " return [r.left + r.width / 2, r.top + r.height / 2]; })()"
        )
        if box is None:
            raise CdpError(f"no element for {selector_js}")
        x, y = box
        self.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        for count in range(1, clicks + 1):
            for kind in ("mousePressed", "mouseReleased"):
                self.send(
                    "Input.dispatchMouseEvent",
                    type=kind,
                    x=x,
                    y=y,
                    button="left",
                    clickCount=count,
                )

    def screenshot(self, path: Path) -> Path:
        data = self.send("Page.captureScreenshot", format="png")["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def errors(self) -> list[str]:
        """Uncaught exceptions and console/log errors the page reported so far."""
        found: list[str] = []
        for event in list(self.events):
            params = event.get("params", {})
            if event.get("method") == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                found.append(str(details.get("exception", {}).get("description") or details))
            elif event.get("method") == "Runtime.consoleAPICalled" and params["type"] == "error":
                found.append(
                    " ".join(str(a.get("value", a.get("description"))) for a in params["args"])
                )
            elif event.get("method") == "Log.entryAdded" and params["entry"]["level"] == "error":
                found.append(str(params["entry"].get("text")))
        return found

    def close(self) -> None:
        with contextlib.suppress(OSError, TimeoutError, CdpError):
            self.send("Browser.close", timeout_s=10)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._to_child)
        os.close(self._from_child)

"""Configuration: pydantic models of ``config.toml``.

Precedence, highest first: CLI overrides > environment (``SCP_NODE_<SECTION>__<KEY>``) >
the TOML file > the defaults below. :func:`load_settings` is the only entry point; it turns a
validation failure into a :class:`~scp_node.errors.ConfigError` that names the offending key.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from scp_node.errors import ConfigError

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")


def _check_ae_title(value: str) -> str:
    """An AE title is 1-16 printable characters, no backslash, not only spaces."""
    if not _AE_TITLE.match(value) or not value.strip():
        raise ValueError("must be 1-16 printable ASCII characters without backslash")
    return value.strip()


class _KeyValueError(ValueError):
    """A model-level check that blames one key, so the message names ``section.N.key``."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NodeSection(_Section):
    """``[node]``: how the Storage SCP presents itself."""

    ae_title: str = "SCPNODE"
    host: str = "0.0.0.0"
    port: int = Field(default=11112, ge=1, le=65535)
    #: Calling AE titles allowed to associate; empty means any.
    allowed_calling_ae: list[str] = Field(default_factory=list)
    #: Maximum PDU size we ask peers to send; 128 KiB measured ~1.3x faster than 16 KiB.
    max_pdu_bytes: int = Field(default=131072, ge=0)
    #: Seconds an idle association is kept open.
    network_timeout_s: float = Field(default=60.0, gt=0)
    #: Storage SCP processes, each with its own AE, served round-robin with the connections
    #: the node accepts on ``port``; 1 runs the SCP in the node's own process. Default: the
    #: number of cores, at most 4.
    receivers: int = Field(default_factory=lambda: min(os.cpu_count() or 1, 4), ge=1, le=64)

    _ae = field_validator("ae_title")(_check_ae_title)

    @field_validator("allowed_calling_ae")
    @classmethod
    def _check_allowed(cls, value: list[str]) -> list[str]:
        return [_check_ae_title(v) for v in value]

    #: Source networks (CIDRs, e.g. ``10.1.2.0/24`` or ``127.0.0.1``) allowed to associate;
    #: empty means any. Checked at association request, beside ``allowed_calling_ae``.
    allowed_source_ips: list[str] = Field(default_factory=list)

    @field_validator("allowed_source_ips")
    @classmethod
    def _check_source_ips(cls, value: list[str]) -> list[str]:
        return [str(ipaddress.ip_network(v.strip(), strict=False)) for v in value]


class StorageSection(_Section):
    """``[storage]``: where accepted instances are kept."""

    spool_dir: Path = Path("var/spool")
    #: Below this many free bytes on the spool's file system new instances get 0xA700.
    min_free_bytes: int = Field(default=1_000_000_000, ge=0)


class DatabaseSection(_Section):
    """``[database]``: the job table."""

    url: str = "sqlite:///var/scp-node.db"


class SettleSection(_Section):
    """``[settle]``: when a study is considered complete."""

    #: A study with no new instance for this long becomes jobs.
    quiet_s: float = Field(default=10.0, ge=0)
    #: How often the settle sweep looks for quiet studies.
    poll_s: float = Field(default=1.0, gt=0)
    #: A series quiet this long starts the job of each model whose card says
    #: ``per_series = true`` (the rest of the study may still be arriving).
    series_quiet_s: float = Field(default=3.0, ge=0)
    #: Ask the sending PACS (a ``[[sources]]`` entry matching the calling AE) by C-FIND how
    #: many instances each received series has: settle at once when all have arrived, wait
    #: past ``quiet_s`` (up to ``max_wait_s`` after the last instance) while some are missing.
    completeness_check: bool = False
    max_wait_s: float = Field(default=300.0, ge=0)
    #: Least time between two C-FINDs about the same study (unless new instances arrived).
    query_interval_s: float = Field(default=5.0, ge=0)


class Source(_Section):
    """``[[sources]]``: a PACS that sends to the node and answers C-FIND about what it sent.

    Its ``ae_title`` is matched against the calling AE title of received instances.
    """

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    ae_title: str
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)

    _ae = field_validator("ae_title")(_check_ae_title)


class WorkerSection(_Section):
    """``[worker]``: inference."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: The first of ``models`` (a one-model configuration may set only this key).
    model: str = "ct-abdomen"
    #: Model folder names under ``models_dir`` this node serves; defaults to ``[model]``.
    models: tuple[str, ...] = ()
    #: Most models a worker keeps loaded at once (least recently used dropped first).
    max_loaded_models: int = Field(default=2, ge=1)
    models_dir: Path = Path("models")
    #: Where finished SEG files wait for dispatch.
    outbox_dir: Path = Path("var/outbox")
    #: A claimed job whose lease is not renewed for this long is requeued.
    lease_s: float = Field(default=120.0, gt=0)
    heartbeat_s: float = Field(default=10.0, gt=0)
    poll_s: float = Field(default=1.0, gt=0)
    #: CPU threads for torch; 0 lets torch decide.
    threads: int = Field(default=0, ge=0)
    #: Added to the nice value of inference (and of settle and dispatch) so that receiving
    #: keeps priority while a job runs; 0 leaves it as it is.
    nice: int = Field(default=10, ge=0, le=19)
    #: Model variant: "" follows the card's ``[runtime]``; ``"auto"`` runs the fastest
    #: variant verified on this machine (CPU); or a variant name. Whatever is chosen is
    #: verified on the card's reference case at start-up (fallback on failure).
    variant: str = Field(default="", max_length=64)
    #: Per-machine cache of the ``auto`` timings (one JSON file per model).
    variant_cache_dir: Path = Path("var/variants")

    @model_validator(mode="before")
    @classmethod
    def _one_model_list(cls, data: Any) -> Any:
        """``model = "x"`` alone means ``models = ["x"]``; with ``models``, ``model`` must
        be one of them (it then names the first)."""
        if not isinstance(data, dict):
            return data
        models = data.get("models")
        if not models:
            return {**data, "models": [data.get("model", "ct-abdomen")]}
        if "model" in data and data["model"] not in models:
            raise ValueError(
                f"worker.model {data['model']!r} is not in worker.models; set only worker.models"
            )
        return {**data, "model": models[0]}


class RetrySection(_Section):
    """``[retry]``: exponential backoff shared by jobs and deliveries."""

    #: Inference attempts before a job fails for good.
    max_attempts: int = Field(default=3, ge=1)
    initial_backoff_s: float = Field(default=5.0, ge=0)
    max_backoff_s: float = Field(default=600.0, ge=0)
    multiplier: float = Field(default=2.0, ge=1.0)
    #: A delivery still failing this long after its first attempt fails for good.
    give_up_after_s: float = Field(default=86_400.0, gt=0)


class TlsSection(_Section):
    """``[tls]``: DICOM over TLS for the Storage SCP and for our SCU.

    ``enabled`` makes the SCP accept only TLS (``cert_file`` + ``key_file`` required).
    Destinations with ``tls = true`` are reached over TLS: the peer's certificate is checked
    against ``ca_file`` (the system's CAs when unset), and ``cert_file``/``key_file`` are
    presented as our client certificate when set.
    """

    enabled: bool = False
    #: PEM certificate (chain) of this node.
    cert_file: Path | None = None
    #: PEM private key of ``cert_file`` (unencrypted).
    key_file: Path | None = None
    #: PEM CA bundle that signs the certificates of the peers we trust.
    ca_file: Path | None = None
    #: SCP: refuse TLS clients without a certificate signed by ``ca_file``.
    require_client_cert: bool = False
    #: SCU: the destination's certificate must name its ``host``.
    check_hostname: bool = True

    @model_validator(mode="after")
    def _check_files(self) -> TlsSection:
        if self.enabled:
            for key in ("cert_file", "key_file"):
                if getattr(self, key) is None:
                    raise _KeyValueError(key, f"{key} is required when tls.enabled = true")
        if self.require_client_cert and self.ca_file is None:
            raise _KeyValueError("ca_file", "ca_file is required with require_client_cert")
        if (self.cert_file is None) != (self.key_file is None):
            raise _KeyValueError("key_file", "cert_file and key_file go together")
        return self


_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"

#: The keys each ``auth.kind`` takes; a secret ``X`` is given as ``X_env`` or ``X_file``.
_AUTH_KEYS = {
    "basic": ("username", "password"),
    "bearer": ("token",),
    "oauth2": ("token_url", "client_id", "client_secret", "scope", "client_auth"),
}
_AUTH_SECRETS = {"basic": "password", "bearer": "token", "oauth2": "client_secret"}


class DestinationAuth(_Section):
    """``[destinations.auth]``: credentials of a ``kind = "dicomweb"`` destination.

    ``kind = "basic"`` (``username`` and a password), ``"bearer"`` (a static token) or
    ``"oauth2"`` (client credentials grant at ``token_url``; the token is cached and renewed
    before it expires). Secrets are never written here: each is named by an environment
    variable (``password_env``) or a file holding it (``password_file``); they are read when
    the dispatcher starts.
    """

    kind: Literal["basic", "bearer", "oauth2"]
    username: str | None = Field(default=None, min_length=1)
    password_env: str | None = Field(default=None, pattern=_ENV_NAME)
    password_file: Path | None = None
    token_env: str | None = Field(default=None, pattern=_ENV_NAME)
    token_file: Path | None = None
    #: OAuth2 token endpoint (``oauth2`` only).
    token_url: str | None = Field(default=None, pattern=r"^https?://[^\s/@]+(/\S*)?$")
    client_id: str | None = Field(default=None, min_length=1)
    client_secret_env: str | None = Field(default=None, pattern=_ENV_NAME)
    client_secret_file: Path | None = None
    #: Space-separated scopes asked for (``oauth2``; none when unset).
    scope: str | None = Field(default=None, min_length=1)
    #: How the client authenticates to the token endpoint: ``"basic"`` (HTTP Basic, the
    #: form RFC 6749 requires servers to support) or ``"body"`` (client_id/client_secret
    #: in the form).
    client_auth: Literal["basic", "body"] = "basic"

    @model_validator(mode="before")
    @classmethod
    def _no_inline_secret(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in ("password", "token", "client_secret"):
                if key in data:
                    raise _KeyValueError(
                        key, f"inline secrets are not accepted: use {key}_env or {key}_file"
                    )
        return data

    @model_validator(mode="after")
    def _check_keys(self) -> DestinationAuth:
        allowed = _AUTH_KEYS[self.kind]
        for key in sorted(self.model_fields_set - {"kind"}):
            if key.removesuffix("_env").removesuffix("_file") not in allowed:
                raise _KeyValueError(key, f"{key} is not used with auth.kind = {self.kind!r}")
        required = {"basic": ("username",), "oauth2": ("token_url", "client_id")}
        for key in required.get(self.kind, ()):
            if getattr(self, key) is None:
                raise _KeyValueError(key, f"{key} is required for auth.kind = {self.kind!r}")
        secret = _AUTH_SECRETS[self.kind]
        given = [k for k in (f"{secret}_env", f"{secret}_file") if getattr(self, k) is not None]
        if len(given) != 1:
            raise _KeyValueError(
                f"{secret}_env", f"give exactly one of {secret}_env and {secret}_file"
            )
        return self


class Destination(_Section):
    """``[[destinations]]``: where every result goes (its SEG, and SR where ``outputs`` say).

    ``kind = "dimse"`` (the default): a DICOM node reached by C-STORE at ``ae_title``,
    ``host`` and ``port`` (all three required). ``kind = "dicomweb"``: a DICOMweb STOW-RS
    service at ``url`` (the DICOMweb root, e.g. ``http://pacs:8042/dicom-web``).
    """

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    kind: Literal["dimse", "dicomweb"] = "dimse"
    ae_title: str | None = None
    host: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    #: DICOMweb root URL (``kind = "dicomweb"`` only).
    url: str | None = Field(default=None, pattern=r"^https?://[^\s/]+(/\S*)?$")
    #: C-STORE over TLS with the ``[tls]`` material (``kind = "dimse"`` only; DICOMweb
    #: destinations use an ``https://`` url).
    tls: bool = False
    #: What to do with a SEG this destination got when a newer SEG of the same series
    #: replaces it: ``"iocm"`` sends an IHE IOCM rejection note (KOS "Rejected for Quality
    #: Reasons") after the new SEG was stored; ``"none"`` leaves the old SEG in place.
    supersede: Literal["iocm", "none"] = "none"
    #: After each store, ask the destination (C-FIND at IMAGE level, or QIDO-RS) whether it
    #: holds the instance; the delivery fails with the reason when it does not.
    verify: bool = False
    #: Credentials for a DICOMweb destination (anonymous when unset).
    auth: DestinationAuth | None = None
    #: What the destination gets of each result, each its own delivery: ``"seg"`` the
    #: SEG, ``"sr"`` its TID 1500 measurement report, ``"sc"`` burned-in overlay images.
    outputs: tuple[Literal["seg", "sr", "sc"], ...] = ("seg",)
    #: The SEG encoding: ``"binary"`` (one frame per slice and segment, read everywhere)
    #: or ``"labelmap"`` (one frame per slice, Label Map Segmentation Storage, for viewers
    #: that read it).
    seg_type: Literal["binary", "labelmap"] = "binary"

    @field_validator("ae_title")
    @classmethod
    def _check_ae(cls, value: str | None) -> str | None:
        return None if value is None else _check_ae_title(value)

    @model_validator(mode="after")
    def _check_kind(self) -> Destination:
        if self.kind == "dimse":
            for key in ("ae_title", "host", "port"):
                if getattr(self, key) is None:
                    raise _KeyValueError(key, f'{key} is required for kind = "dimse"')
            if self.url is not None:
                raise _KeyValueError("url", 'url is only used with kind = "dicomweb"')
        elif self.url is None:
            raise _KeyValueError("url", 'url is required for kind = "dicomweb"')
        elif "@" in self.url.split("/")[2]:
            raise _KeyValueError("url", "credentials do not go in url: use [destinations.auth]")
        if self.auth is not None and self.kind != "dicomweb":
            raise _KeyValueError("auth", 'auth is only used with kind = "dicomweb"')
        if self.tls and self.kind != "dimse":
            raise _KeyValueError("tls", 'tls is only used with kind = "dimse" (use https://)')
        if not self.outputs or len(set(self.outputs)) != len(self.outputs):
            raise _KeyValueError("outputs", "outputs must name each of seg, sr, sc at most once")
        if self.seg_type == "labelmap" and self.supersede == "iocm":
            # A rejection note names the BINARY SEG it retracts; the LABELMAP one a
            # destination holds has another UID.
            raise _KeyValueError(
                "seg_type", 'seg_type = "labelmap" cannot be combined with supersede = "iocm" yet'
            )
        return self


class LogSection(_Section):
    """``[log]``: JSON lines to stdout and to a rotating file."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    dir: Path = Path("var/log")
    max_bytes: int = Field(default=10_000_000, ge=1024)
    backups: int = Field(default=5, ge=0)


class WebSection(_Section):
    """``[web]``: the dashboard, ``/metrics`` and ``/healthz``."""

    #: Start the web server with ``scp-node serve``.
    enabled: bool = True
    #: Loopback by default; any other address requires ``token`` for mutating requests.
    host: str = "127.0.0.1"
    #: 0 picks a free port (tests).
    port: int = Field(default=8080, ge=0, le=65535)
    #: Admin token for retry/cancel (``Authorization: Bearer``, or the form field ``token``).
    token: str | None = Field(default=None, min_length=16)
    #: Seconds between automatic refreshes of the job list and health pages.
    refresh_s: float = Field(default=5.0, gt=0)


class Settings(BaseSettings):
    """The whole configuration; see ``config.toml`` for every key with its meaning."""

    model_config = SettingsConfigDict(
        env_prefix="SCP_NODE_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    node: NodeSection = NodeSection()
    storage: StorageSection = StorageSection()
    database: DatabaseSection = DatabaseSection()
    settle: SettleSection = SettleSection()
    worker: WorkerSection = WorkerSection()
    retry: RetrySection = RetrySection()
    log: LogSection = LogSection()
    web: WebSection = WebSection()
    tls: TlsSection = TlsSection()
    destinations: list[Destination] = Field(default_factory=list)
    sources: list[Source] = Field(default_factory=list)

    @field_validator("destinations")
    @classmethod
    def _unique_names(cls, value: list[Destination]) -> list[Destination]:
        names = [d.name for d in value]
        if len(names) != len(set(names)):
            raise ValueError("destination names must be unique")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))


def _format_error(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        loc = list(item["loc"])
        cause = item.get("ctx", {}).get("error")
        if isinstance(cause, _KeyValueError):
            loc.append(cause.key)
        key = ".".join(str(part) for part in loc) or "<root>"
        lines.append(f"{key}: {item['msg']}")
    return "invalid configuration: " + "; ".join(lines)


def load_settings(
    config_path: Path | None = None, overrides: dict[str, Any] | None = None
) -> Settings:
    """Load settings from ``config_path``, the environment and ``overrides``.

    Parameters
    ----------
    config_path
        A TOML file; ``None`` uses only environment and defaults.
    overrides
        Nested values from the command line, e.g. ``{"node": {"port": 11113}}``.

    Raises
    ------
    ConfigError
        The file is missing or not TOML, or a value is invalid; the message names the key.
    """
    if config_path is not None and not config_path.is_file():
        raise ConfigError(f"configuration file not found: {config_path}")

    class _FileSettings(Settings):
        model_config = SettingsConfigDict(toml_file=config_path)

    try:
        loaded = _FileSettings(**(overrides or {}))
    except ValidationError as exc:
        raise ConfigError(_format_error(exc)) from exc
    except ValueError as exc:  # tomllib.TOMLDecodeError is a ValueError
        raise ConfigError(f"cannot read {config_path}: {exc}") from exc
    return loaded

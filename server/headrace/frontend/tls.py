"""TLS credentials of the front end, reloadable without dropping connections."""

from __future__ import annotations

import logging

import grpc

from headrace.config import TlsSettings
from headrace.errors import StartupError

_logger = logging.getLogger(__name__)


class ServerTls:
    """The server's certificate (and, for mutual TLS, the clients' CA), read from files.

    grpc asks `_fetch` for a new configuration before each handshake; after `reload` it gets
    the files' current contents once, so new connections use them while open ones keep their
    session.
    """

    def __init__(self, settings: TlsSettings) -> None:
        self._settings = settings
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self.credentials = grpc.dynamic_ssl_server_credentials(
            self._load(),
            # grpc documents None as "no change"; grpc-stubs types the fetcher without it.
            self._fetch,  # type: ignore[arg-type]
            require_client_authentication=settings.client_ca_file is not None,
        )

    def _load(self) -> grpc.ServerCertificateConfiguration:
        settings = self._settings
        try:
            chain = settings.cert_file.read_bytes()
            key = settings.key_file.read_bytes()
            roots = settings.client_ca_file.read_bytes() if settings.client_ca_file else None
        except OSError as exc:
            raise StartupError(
                f"server.tls: cannot read {exc.filename}: {exc.strerror or exc}"
            ) from exc
        return grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=roots)

    def reload(self) -> None:
        """Read the files again (on SIGHUP); a file that cannot be read keeps the old
        configuration and is logged. The key is never logged."""
        try:
            self._pending = self._load()
        except StartupError as exc:
            _logger.error("TLS reload failed, keeping the current certificate: %s", exc)
            return
        _logger.info("TLS certificate reloaded from %s", self._settings.cert_file)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # Called from grpc's own threads before handshakes; one attribute swap is enough.
        pending, self._pending = self._pending, None
        return pending

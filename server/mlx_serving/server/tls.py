"""TLS on the gRPC port, mutual when a client CA is given, with certificates rotated in place.

grpc asks `ServerCertificates` for a new configuration at each handshake (its dynamic
credentials); the files are read again when their stamps (mtime, size, inode) change or after
SIGHUP, so a renewed certificate is served without a restart. A pair that does not load (a
half-written rotation, a key that does not match) is logged and the old one kept.

The files are checked with Python's `ssl` before grpc sees them: grpc would accept any bytes
and fail every handshake instead.
"""

import logging
import ssl
import threading
from pathlib import Path

import grpc

from .auth import Stamp, file_stamp

log = logging.getLogger(__name__)

CERT_KEY = "server.tls.cert_file"
KEY_KEY = "server.tls.key_file"
CLIENT_CA_KEY = "server.tls.client_ca_file"


class TlsError(Exception):
    """A TLS file that cannot be served; `key` is the config key naming it."""

    def __init__(self, key: str, problem: str):
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


class ServerCertificates:
    """The server's certificate chain and key, and the CA its clients must chain to (if any)."""

    def __init__(self, cert_file: Path, key_file: Path, client_ca_file: Path | None = None):
        self.files = (cert_file, key_file, client_ca_file)
        self._lock = threading.Lock()
        self._stamps = file_stamps(self.files)
        self._failed_stamps: tuple[Stamp, ...] | None = None
        self._initial = read_configuration(cert_file, key_file, client_ca_file)
        self._pending: grpc.ServerCertificateConfiguration | None = None

    @property
    def mutual(self) -> bool:
        return self.files[2] is not None

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._initial, self._fetch, require_client_authentication=self.mutual
        )

    def reload(self) -> None:
        """SIGHUP: read the files now, changed or not; the next handshake serves them."""
        self._load(force=True)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """grpc's callback, at each handshake on one of its threads: a new configuration, or
        None to keep the current one. It must not raise."""
        try:
            self._load(force=False)
            with self._lock:
                pending, self._pending = self._pending, None
            return pending
        except Exception:
            log.exception("reading the TLS files failed; serving the previous certificate")
            return None

    def _load(self, force: bool) -> None:
        with self._lock:
            stamps = file_stamps(self.files)
            if not force and stamps in (self._stamps, self._failed_stamps):
                return
            try:
                configuration = read_configuration(*self.files)
            except TlsError as exc:
                self._failed_stamps = stamps
                log.error("TLS files not reloaded, serving the previous certificate: %s", exc)
                return
            self._stamps, self._failed_stamps, self._pending = stamps, None, configuration
        log.info("TLS certificate reloaded from %s", self.files[0])


def file_stamps(files: tuple[Path | None, ...]) -> tuple[Stamp, ...]:
    """What tells a rewritten or replaced file from the one read before (None: unreadable)."""
    return tuple(file_stamp(path) if path is not None else None for path in files)


def read_configuration(
    cert_file: Path, key_file: Path, client_ca_file: Path | None = None
) -> grpc.ServerCertificateConfiguration:
    """The files as grpc serves them, once `ssl` loaded them; raises TlsError saying which file
    is wrong and how."""
    chain = read_pem(cert_file, CERT_KEY)
    key = read_pem(key_file, KEY_KEY)
    if b"PRIVATE KEY-----" not in key:
        raise TlsError(KEY_KEY, f"{key_file} holds no PEM private key")
    check_certificates(cert_file, CERT_KEY)
    check_pair(cert_file, key_file)
    client_ca = None
    if client_ca_file is not None:
        client_ca = read_pem(client_ca_file, CLIENT_CA_KEY)
        check_certificates(client_ca_file, CLIENT_CA_KEY)
    return grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=client_ca)


def read_pem(path: Path, key: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TlsError(key, f"cannot read {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise TlsError(key, f"{path} is not PEM")
    return data


def check_certificates(path: Path, key: str) -> None:
    """`path` holds at least one PEM certificate."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except ssl.SSLError as exc:
        raise TlsError(key, f"{path} holds no valid PEM certificate ({ssl_reason(exc)})") from None


def check_pair(cert_file: Path, key_file: Path) -> None:
    """The key is a PEM private key, unencrypted, matching the chain's first certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert_file, key_file, password=refuse_encrypted_key)
    except EncryptedKey:
        raise TlsError(KEY_KEY, f"{key_file} is encrypted; give an unencrypted key") from None
    except ssl.SSLError as exc:
        problem = f"{key_file} is not the private key of {cert_file} ({ssl_reason(exc)})"
        raise TlsError(KEY_KEY, problem) from None


class EncryptedKey(Exception):
    pass


def refuse_encrypted_key() -> bytes:
    """Asked for a password: without this, OpenSSL would prompt on the terminal."""
    raise EncryptedKey


def ssl_reason(exc: ssl.SSLError) -> str:
    return (exc.reason or str(exc)).lower().replace("_", " ")

"""TLS for the gRPC port: server credentials from ``--tls-cert``/``--tls-key``, and mutual TLS
with ``--tls-client-ca`` (clients must present a certificate signed by one of its CAs)."""

from __future__ import annotations

from pathlib import Path

import grpc


def _pem(path: Path, option: str, what: str, marker: bytes) -> bytes:
    data = Path(path).expanduser().read_bytes()
    if marker not in data:
        raise ValueError(f"{option} {str(path)!r} holds no PEM {what}")
    return data


def server_credentials(cert: Path, key: Path, client_ca: Path | None = None) -> grpc.ServerCredentials:
    """TLS credentials of the server; with ``client_ca``, client certificates are required and
    checked against it. Raises ``ValueError`` naming the option of a file that is not PEM."""
    certificate = b"-----BEGIN CERTIFICATE-----"
    chain = _pem(cert, "--tls-cert", "certificate", certificate)
    private_key = _pem(key, "--tls-key", "private key", b"PRIVATE KEY-----")
    roots = _pem(client_ca, "--tls-client-ca", "certificate", certificate) if client_ca is not None else None
    return grpc.ssl_server_credentials([(private_key, chain)], root_certificates=roots,
                                       require_client_auth=roots is not None)

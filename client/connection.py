"""How the clients reach a server that uses TLS and bearer tokens (``docs/operations.md``).

Every client takes the same options (``add_connection_args``):

* ``--tls``: a TLS channel, verified against the system's CA certificates, or
  ``--tls-ca FILE`` (implies ``--tls``) for a private CA / self-signed certificate;
* ``--tls-cert FILE --tls-key FILE``: a client certificate, for mutual TLS;
* ``--tls-server-name NAME``: the name to verify when it differs from HOST
  (connecting by IP address to a certificate issued for a name);
* ``--token-file FILE`` (or ``ASR_TOKEN`` in the environment): sends
  ``authorization: Bearer <token>`` with every call; the token is the file's first
  line that is neither blank nor a ``#`` comment (the server's token file format).

Several servers without a proxy (client-side balancing): ``--server`` takes any gRPC target,
``dns:///asr-headless.asr.svc:50051`` (every address the name resolves to, re-resolved as
servers come and go) or ``ipv4:10.0.0.1:50051,10.0.0.2:50051`` (a fixed list); ``--lb``
picks the policy: ``round_robin`` (one connection to each address, successive calls spread
across them; the default for ``dns:``, ``ipv4:`` and ``ipv6:`` targets) or ``pick_first``
(one connection, to the first address that answers; the default for HOST:PORT).

``Connection.channel()`` opens an aio channel that adds the token to every call;
``Connection.sync_channel()`` a blocking one, whose calls pass ``metadata=connection.metadata``.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc

TOKEN_ENV = "ASR_TOKEN"
LB_POLICIES = ("auto", "round_robin", "pick_first")
MULTI_ADDRESS_SCHEMES = ("dns:", "ipv4:", "ipv6:")


def lb_policy(address: str, lb: str = "auto") -> str:
    """The load-balancing policy for ``address``: ``lb``, or with "auto" round_robin for the
    target schemes that name several servers (dns:, ipv4:, ipv6:), pick_first otherwise."""
    if lb != "auto":
        return lb
    return "round_robin" if address.startswith(MULTI_ADDRESS_SCHEMES) else "pick_first"


class ConnectionOptionError(ValueError):
    """A connection option that cannot be used (unreadable file, key without certificate, ...)."""


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConnectionOptionError(f"{what} {str(path)!r} cannot be read: {exc.strerror or exc}") from None


@dataclass(frozen=True)
class Connection:
    """A server address and how to authenticate to it."""

    address: str
    tls: bool = False
    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None
    server_name: str | None = None
    token: str | None = None
    lb: str = "auto"  # see lb_policy

    def _options(self, options: list | None) -> list:
        out = [("grpc.lb_policy_name", lb_policy(self.address, self.lb)), *(options or [])]
        if self.server_name:
            out.append(("grpc.ssl_target_name_override", self.server_name))
        return out

    def _credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                            certificate_chain=self.cert)

    def channel(self, options: list | None = None) -> grpc.aio.Channel:
        interceptors = _bearer_interceptors(self.token) if self.token else None
        if self.tls:
            return grpc.aio.secure_channel(self.address, self._credentials(), options=self._options(options),
                                           interceptors=interceptors)
        return grpc.aio.insecure_channel(self.address, options=self._options(options), interceptors=interceptors)

    def sync_channel(self, options: list | None = None) -> grpc.Channel:
        """A blocking channel; unlike ``channel()`` its calls need ``metadata=self.metadata``."""
        if self.tls:
            return grpc.secure_channel(self.address, self._credentials(), options=self._options(options))
        return grpc.insecure_channel(self.address, options=self._options(options))

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()


def _with_token(details: grpc.aio.ClientCallDetails, token: str) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()), ("authorization", f"Bearer {token}"))
    return details._replace(metadata=metadata)


def _bearer_interceptors(token: str) -> list:
    class UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
        async def intercept_unary_unary(self, continuation, details, request):
            return await continuation(_with_token(details, token), request)

    class UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
        async def intercept_unary_stream(self, continuation, details, request):
            return await continuation(_with_token(details, token), request)

    class StreamUnary(grpc.aio.StreamUnaryClientInterceptor):
        async def intercept_stream_unary(self, continuation, details, request_iterator):
            return await continuation(_with_token(details, token), request_iterator)

    class StreamStream(grpc.aio.StreamStreamClientInterceptor):
        async def intercept_stream_stream(self, continuation, details, request_iterator):
            return await continuation(_with_token(details, token), request_iterator)

    return [UnaryUnary(), UnaryStream(), StreamUnary(), StreamStream()]


def add_connection_args(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """The TLS and token options, named ``--{prefix}tls`` etc. (the caller adds ``--server``)."""
    g = parser.add_argument_group("TLS and authentication to the gRPC server")
    o = f"--{prefix}"
    g.add_argument(f"{o}tls", action="store_true", help="connect with TLS (server certificate checked against "
                   f"the system's CA certificates, or {o}tls-ca)")
    g.add_argument(f"{o}tls-ca", type=Path, metavar="FILE", help="PEM CA certificate(s) to verify the server "
                   f"with (implies {o}tls)")
    g.add_argument(f"{o}tls-cert", type=Path, metavar="FILE", help="PEM client certificate, for mutual TLS")
    g.add_argument(f"{o}tls-key", type=Path, metavar="FILE", help=f"PEM private key of {o}tls-cert")
    g.add_argument(f"{o}tls-server-name", metavar="NAME", help="name to verify in the server's certificate "
                   "when it differs from the address's host")
    g.add_argument(f"{o}lb", choices=LB_POLICIES, default="auto", help="balancing across the servers "
                   "a target names (dns:///NAME:PORT, ipv4:ADDR:PORT,ADDR:PORT): round_robin spreads calls "
                   "over all of them, pick_first uses one (default auto: round_robin for dns:, ipv4: and ipv6: "
                   "targets)")
    g.add_argument(f"{o}token-file", type=Path, metavar="FILE", help=f"send 'authorization: Bearer <token>' "
                   f"with the token in FILE (default: ${TOKEN_ENV} when set)")


def connection_from_args(args: argparse.Namespace, address: str | None = None, prefix: str = "") -> Connection:
    """A ``Connection`` from parsed ``add_connection_args`` options; raises ``ConnectionOptionError``."""
    address = address or args.server
    opt = {name: getattr(args, (prefix + name).replace("-", "_"), None)
           for name in ("tls", "tls-ca", "tls-cert", "tls-key", "tls-server-name", "token-file", "lb")}
    o = f"--{prefix}"
    if (opt["tls-cert"] is None) != (opt["tls-key"] is None):
        raise ConnectionOptionError(f"{o}tls-cert and {o}tls-key go together (mutual TLS needs both)")
    tls = bool(opt["tls"] or opt["tls-ca"] or opt["tls-cert"])
    if opt["tls-server-name"] and not tls:
        raise ConnectionOptionError(f"{o}tls-server-name needs {o}tls")
    token = None
    if opt["token-file"] is not None:
        lines = _read(opt["token-file"], f"{o}token-file").decode("utf-8", "replace").splitlines()
        tokens = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
        token = tokens[0] if tokens else ""
        if not token:
            raise ConnectionOptionError(f"{o}token-file {str(opt['token-file'])!r} holds no token")
    elif os.environ.get(TOKEN_ENV, "").strip():
        token = os.environ[TOKEN_ENV].strip()
    if token and not tls and not _is_loopback(address):
        print(f"warning: sending a bearer token to {address} without TLS", file=sys.stderr)
    return Connection(address=address, tls=tls,
                      ca=_read(opt["tls-ca"], f"{o}tls-ca") if opt["tls-ca"] else None,
                      cert=_read(opt["tls-cert"], f"{o}tls-cert") if opt["tls-cert"] else None,
                      key=_read(opt["tls-key"], f"{o}tls-key") if opt["tls-key"] else None,
                      server_name=opt["tls-server-name"], token=token, lb=opt["lb"] or "auto")


def _is_loopback(address: str) -> bool:
    """Whether every address a target names is this host's (a dns: name is not known to be)."""
    if address.startswith(MULTI_ADDRESS_SCHEMES):
        if not address.startswith(("ipv4:", "ipv6:")):
            return False
        return all(_is_loopback(a) for a in address.split(":", 1)[1].split(","))
    host = address.rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "127.0.0.1", "::1") or host.startswith("127.")


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None,
               prefix: str = "") -> argparse.Namespace:
    """``parser.parse_args`` plus ``args.connection`` (a ``Connection`` to ``--server``); a bad
    connection option exits with status 2 and the parser's usage message, like any bad option."""
    args = parser.parse_args(argv)
    try:
        args.connection = connection_from_args(args, prefix=prefix)
    except ConnectionOptionError as exc:
        parser.error(str(exc))
    return args

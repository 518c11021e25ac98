"""``asr-server``: run the streaming recognition server."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from pydantic import ValidationError
from pydantic_settings import CliSettingsSource

from server.config import ServerSettings
from server.kernels.precision import PrecisionError
from server.model.loading import ModelLoadError
from server.observability.gc_pauses import freeze_startup_heap


def parse_settings(argv: list[str] | None = None) -> ServerSettings:
    """Settings from flags, then ``ASR_*`` variables, then defaults; exits 2 on invalid values."""
    try:
        source = CliSettingsSource(ServerSettings, cli_parse_args=argv if argv is not None else sys.argv[1:],
                                   cli_prog_name="asr-server", cli_kebab_case=True, cli_implicit_flags=True)
        return ServerSettings(_cli_settings_source=source(args=argv if argv is not None else sys.argv[1:]))
    except ValidationError as exc:
        for err in exc.errors():
            name = str(err["loc"][0]) if err["loc"] else "settings"
            option = "--" + name.replace("_", "-")
            print(f"asr-server: invalid value for {option} (env ASR_{name.upper()}): {err['msg']}",
                  file=sys.stderr)
        raise SystemExit(2) from None


async def run(settings: ServerSettings) -> int:
    from server.app import AsrServer

    server = AsrServer(settings)
    try:
        port = await server.start()
    except ModelLoadError as exc:
        logging.getLogger("asr-server").error("cannot load model: %s", exc)
        return 1
    except PrecisionError as exc:
        logging.getLogger("asr-server").error("cannot start: %s", exc)
        await server.stop(grace=0)
        return 1
    except (OSError, ValueError) as exc:  # a port that cannot be bound, a TLS file that is not PEM
        logging.getLogger("asr-server").error("cannot start: %s", exc)
        await server.stop(grace=0)
        return 1
    signals = catch_stop_signals()  # before "listening": a SIGTERM from then on drains
    if settings.gc_freeze:
        frozen = freeze_startup_heap()
        logging.getLogger("asr-server").info("garbage collector: %d start-up objects frozen (--no-gc-freeze "
                                             "to keep them collectable)", frozen)
    print(f"asr-server listening on {settings.host}:{port}", flush=True)
    if server.metrics_port:
        print(f"asr-server metrics on http://{settings.metrics_host}:{server.metrics_port}/metrics", flush=True)
    return await serve_until_signalled(server, settings.drain_timeout, signals)


def catch_stop_signals() -> asyncio.Queue[signal.Signals]:
    """SIGINT and SIGTERM, from now on, go to the returned queue instead of ending the process."""
    signals: asyncio.Queue[signal.Signals] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, signals.put_nowait, sig)
    return signals


async def serve_until_signalled(server, drain_timeout: float, signals: asyncio.Queue[signal.Signals]) -> int:
    """Serve until SIGTERM or SIGINT (from ``signals``), then drain (``AsrServer.drain``) and
    exit 0; a second signal during the drain stops at once (open streams are cut) and exits 1."""
    log = logging.getLogger("asr-server")
    first = await signals.get()
    log.info("%s: draining for up to %g s (--drain-timeout); a second SIGTERM or SIGINT stops at once",
             first.name, drain_timeout)
    drain = asyncio.create_task(server.drain(drain_timeout))
    second = asyncio.create_task(signals.get())
    await asyncio.wait({drain, second}, return_when=asyncio.FIRST_COMPLETED)
    if not drain.done():
        drain.cancel()
        log.warning("%s during the drain: stopping at once, cutting %d open streams",
                    second.result().name, server.active_sessions)
        await server.stop(grace=0)
        return 1
    second.cancel()
    log.info("drained: stopping")
    await server.stop(grace=1.0)
    return 0


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(argv)
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(run(settings))


if __name__ == "__main__":
    sys.exit(main())

"""The one stream loop and request handler of the three gRPC protocols (asr.v1, Riva, Google).

All three streams look alike: a first message with the config (``streaming_config``), then
messages of audio (``audio_content``), under the same ``oneof streaming_request``. A protocol
module only converts: its config message to a ``StreamConfig`` (its ``start``), and each
``Result`` back to its response message; ``stream_results`` does the rest (session, size and
idle checks, backpressure, half-close, freeing the session on every exit path).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterator, Callable

from server.core.service import RecognitionService
from server.core.session import Session, SessionState
from server.errors import ASRError, ErrorCode, invalid
from server.types import LimitReason, Result

log = logging.getLogger(__name__)


def check_message_size(request, session_or_service) -> None:
    """RESOURCE_EXHAUSTED (counted) for a message over ``--max-message-bytes``. gRPC itself refuses
    messages over twice the limit before the server sees them (same status, not counted)."""
    size = request.ByteSize()
    limit = session_or_service.settings.max_message_bytes
    if size > limit:
        session_or_service.observer.limit_hit(LimitReason.MAX_MESSAGE_BYTES)
        raise ASRError(ErrorCode.RESOURCE_EXHAUSTED, f"a message of {size} bytes is larger than the "
                       f"limit of {limit} bytes (--max-message-bytes); send audio in smaller pieces")


def streaming_config_of(first):
    """The first message's ``streaming_config``; INVALID_ARGUMENT when it carries audio instead."""
    if first.WhichOneof("streaming_request") != "streaming_config":
        raise invalid("the first message must carry streaming_config, before any audio")
    return first.streaming_config


def audio_of(request) -> bytes:
    """A later message's ``audio_content``; INVALID_ARGUMENT for a second config or an empty message."""
    kind = request.WhichOneof("streaming_request")
    if kind == "audio_content":
        return request.audio_content
    if kind == "streaming_config":
        raise invalid("streaming_config was sent twice; only the first message may carry it")
    raise invalid("a request must carry streaming_config or audio_content")


async def next_request(requests, session: Session):
    """The stream's next message, size-checked; None when the client half-closed, or when the
    stream went idle (no audio, or audio slower than ``--min-audio-rate``, for long enough:
    ``server.core.pace``); the session is then ended gracefully: final result, then OUT_OF_RANGE.
    Waiting for the first message (the config) also ends when the session is ended by the server
    (drain): its status is raised."""
    settings = session.settings
    first = session.state is SessionState.OPEN
    timeout = max(0.0, session.pace.idle_deadline - time.monotonic())
    read = asyncio.ensure_future(anext(requests))
    waits = {read, asyncio.ensure_future(session.ending.wait())} if first else {read}
    try:
        done, _ = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in waits:
            task.cancel()
    if read in done:
        try:
            request = read.result()
        except StopAsyncIteration:
            return None
        check_message_size(request, session)
        return request
    if not done:  # idle
        session.observer.limit_hit(LimitReason.IDLE_TIMEOUT)
        limit = f"{settings.idle_timeout_seconds:g} s (--idle-timeout-seconds)"
        slow = settings.min_audio_rate > 0
        session.end_input(ASRError(ErrorCode.OUT_OF_RANGE, f"no streaming_config within {limit}" if first else
                                   f"no audio for {limit}" + (f", or audio slower than {settings.min_audio_rate:g} "
                                   f"of real time (--min-audio-rate)" if slow else "") +
                                   ": the stream was ended after the final result of the audio received"))
    if first:
        raise session.end_status
    return None


async def read_first(requests, session: Session):
    """A stream's first message (meant to carry the config); ASRError if there is none."""
    first = await next_request(requests, session)
    if first is None:
        raise invalid("the stream ended before its first message; the first message must carry "
                      "streaming_config")
    return first


async def pump_requests(requests, session: Session, feed: Callable[[bytes], None],
                        check: Callable[[Any], None] | None = None) -> None:
    """Feed a stream's remaining messages' audio into ``feed`` while the session reads audio, then
    half-close it; errors end the session's results with that error. ``check(request)``, when
    given, vets each message first (a protocol's own per-message fields). Reading pauses while the
    session buffers more than ``--max-buffered-seconds`` (backpressure)."""
    try:
        while session.accepting_audio:
            request = await next_request(requests, session)
            if request is None:
                break
            if check is not None:
                check(request)
            feed(audio_of(request))
            if not session.has_room:
                await session.wait_for_room()
                session.pace.refill(time.monotonic())  # a client held back by us is not idle
        session.finish_input()
    except ASRError as exc:
        session.fail(exc)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # transport errors while reading: the client went away
        log.debug("reading stream %d failed: %r", session.id, exc)
        session.fail(ASRError(ErrorCode.CANCELLED, "the client stopped sending"))


async def stream_results(service: RecognitionService, api: str, requests,
                         start: Callable[[Any, Session], Callable[[bytes], None]], client: str = "",
                         check: Callable[[Any], None] | None = None) -> AsyncIterator[tuple[Any, Result]]:
    """One stream of any of the gRPC protocols through the service's one recognition path: open a
    session (counted under ``api``, charged to ``client``), let ``start(first_request, session)``
    configure it and return the feed of each later message's audio bytes, pump those
    (``pump_requests``, with ``check``), and yield ``(first_request, result)`` pairs. The session is
    freed on every exit path; use with ``contextlib.aclosing``."""
    session = service.open_session(api, client)
    reader = None
    try:
        requests = aiter(requests)
        first = await read_first(requests, session)
        feed = start(first, session)
        reader = asyncio.create_task(pump_requests(requests, session, feed, check))
        async for result in session.results():
            yield first, result
    finally:
        if reader is not None:
            reader.cancel()
        service.close_session(session)

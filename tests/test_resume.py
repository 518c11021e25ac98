"""Units of ``client.stream.Resume``: the kept audio (``_Tape``) and the shift of a resumed
stream's results (``_shift``). tests/test_nginx.py resumes real streams cut by a killed server
behind HAProxy and nginx."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from asr.v1 import asr_pb2
from client.stream import Resume, ResumeLimitError, _shift, _Tape

RATE = 16000
BPS = RATE * 2  # bytes per second, mono LINEAR16


async def source(chunks: list[bytes], gate: asyncio.Event | None = None):
    for i, chunk in enumerate(chunks):
        if gate is not None and i == len(chunks) - 1:
            await gate.wait()  # the last chunk comes only when the gate opens
        yield chunk


def numbered(n: int, size: int) -> list[bytes]:
    """``n`` chunks of ``size`` bytes, chunk i all bytes i (a replay's bytes tell where they came from)."""
    return [bytes([i]) * size for i in range(n)]


async def read_all(tape: _Tape, pos: int) -> bytes:
    return b"".join([piece async for piece in tape.read(pos)])


async def test_the_tape_gives_the_source_and_keeps_the_audio_since_the_last_final():
    chunks = numbered(10, 3200)  # 10 chunks of 0.1 s
    tape = _Tape(source(chunks), 2, keep_bytes=30 * BPS)
    assert await read_all(tape, 0) == b"".join(chunks)
    assert tape.start == 0 and tape.resumable
    tape.final(0.35, BPS)  # a final result ends 0.35 s in: the middle of chunk 3
    assert tape.resume_at == int(0.35 * BPS)
    assert tape.start == 3 * 3200  # chunks 0-2 dropped, chunk 3 kept whole
    assert tape.resumable
    # a new stream from the final's end: the rest of chunk 3, then 4-9
    assert await read_all(tape, tape.resume_at) == b"".join(chunks)[int(0.35 * BPS):]
    tape.final(0.2, BPS)  # an older end never moves the resume point back
    assert tape.resume_at == int(0.35 * BPS)


async def test_a_read_cancelled_mid_way_loses_no_chunk():
    chunks = numbered(4, 320)
    gate = asyncio.Event()
    tape = _Tape(source(chunks, gate), 2, keep_bytes=30 * BPS)
    got: list[bytes] = []

    async def consume():
        async for piece in tape.read(0):
            got.append(piece)

    task = asyncio.create_task(consume())
    while len(got) < 3:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)  # the reader now waits for the last chunk
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    gate.set()
    # the next read (a new stream) from the start gets every chunk, the last one included, once
    assert await read_all(tape, 0) == b"".join(chunks)
    assert tape.end == 4 * 320 and tape.ended
    tape.close()


async def test_past_its_limit_the_tape_drops_the_oldest_audio_and_is_not_resumable():
    chunks = numbered(30, 3200)  # 3 s
    tape = _Tape(source(chunks), 2, keep_bytes=BPS)  # keep 1 s
    assert await read_all(tape, 0) == b"".join(chunks)
    # no final result: the stream would start over from 0, but only the last second is kept
    assert tape.start == 20 * 3200 and not tape.resumable
    tape.final(2.5, BPS)
    assert tape.resumable and tape.start == 25 * 3200
    assert await read_all(tape, tape.resume_at) == b"".join(chunks[25:])


async def test_a_source_error_reaches_the_reader():
    async def failing():
        yield b"\0\0"
        raise OSError("microphone gone")

    tape = _Tape(failing(), 2, keep_bytes=BPS)
    with pytest.raises(OSError, match="microphone gone"):
        await read_all(tape, 0)


def test_a_resumed_streams_results_move_by_the_replay_start():
    response = asr_pb2.StreamingRecognizeResponse(results=[asr_pb2.StreamingRecognitionResult(
        is_final=True, utterance_index=0,
        alternatives=[asr_pb2.SpeechRecognitionAlternative(transcript="go on", words=[
            asr_pb2.WordInfo(word="go", start_time={"nanos": 100_000_000}, end_time={"nanos": 300_000_000}),
            asr_pb2.WordInfo(word="on", start_time={"nanos": 400_000_000}, end_time={"seconds": 1})])],
        result_start_time={"nanos": 50_000_000}, result_end_time={"seconds": 1, "nanos": 200_000_000})])
    _shift(response, 4_560_000_000, 2)
    result = response.results[0]
    assert result.utterance_index == 2
    assert result.result_start_time.ToNanoseconds() == 4_610_000_000
    assert result.result_end_time.ToNanoseconds() == 5_760_000_000
    assert [(w.start_time.ToNanoseconds(), w.end_time.ToNanoseconds()) for w in result.alternatives[0].words] == [
        (4_660_000_000, 4_860_000_000), (4_960_000_000, 5_560_000_000)]


def test_the_limit_error_keeps_the_cuts_status_and_says_why():
    cut = grpc.aio.AioRpcError(grpc.StatusCode.CANCELLED, grpc.aio.Metadata(), grpc.aio.Metadata(),
                               "Received RST_STREAM with error code 8")
    error = ResumeLimitError(cut, 31.42, 30.0)
    assert error.code() == grpc.StatusCode.CANCELLED
    assert error.details() == ("Received RST_STREAM with error code 8 (not resumed: 31.4 s of audio since the "
                               "last final result, more than the 30 s kept)")
    assert Resume().pause(1) == 0.05 and Resume().pause(3) == 0.2

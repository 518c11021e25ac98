"""What the Riva and Google Cloud Speech adapters share beside the stream loop (``streaming``).

Both protocols look alike: a first message with the config, then audio bytes
split anywhere (a WAV file's header included, as their sample clients send it),
one language, a maximum number of alternatives. These functions turn that into
the service's ``StreamConfig`` / ``Session`` calls; the adapters only name the
fields in their own protocol's words.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from server.core.service import RecognitionService
from server.core.session import Session
from server.errors import invalid, shown
from server.types import DecodingMethod, StreamConfig

LANGUAGE = "en-US"  # every model this server loads is English


def unsupported(field: str, what: str = "is not supported by this server") -> Exception:
    return invalid(f"{field} {what}")


def check_language(code: str, field: str) -> None:
    """Empty (the default) or any English tag; anything else is refused."""
    if code and code.replace("_", "-").split("-")[0].lower() != "en":
        raise invalid(f"{field} {shown(code)} is not available: this server recognises English ({LANGUAGE})")


def alternatives_decoding(service: RecognitionService, max_alternatives: int,
                          field: str) -> tuple[DecodingMethod | None, int, int]:
    """(method, beam_width, max_alternatives) for a request that asks for up to
    ``max_alternatives`` hypotheses: more than one needs beam search, as wide as the server
    allows (both protocols let the server return fewer than asked)."""
    if max_alternatives < 0:
        raise invalid(f"{field} must not be negative, got {max_alternatives}")
    if max_alternatives <= 1:
        return None, 0, 1
    s = service.settings
    width = min(max(s.beam_width, max_alternatives), s.max_beam_width)
    return DecodingMethod.BEAM_SEARCH, width, min(max_alternatives, width)


# --- audio -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class WavFormat:
    format_tag: int
    channels: int
    sample_rate: int
    bits: int
    data_offset: int  # where the samples start


_PCM, _EXTENSIBLE = 1, 0xFFFE


def parse_wav_header(data: bytes) -> WavFormat | None:
    """The format of a RIFF/WAVE header at the start of ``data``; None when ``data`` is not a WAV
    file. The header must be whole (up to the start of the ``data`` chunk)."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    offset, fmt = 12, None
    while offset + 8 <= len(data):
        chunk, size = data[offset:offset + 4], struct.unpack_from("<I", data, offset + 4)[0]
        if chunk == b"fmt " and size >= 16 and offset + 8 + size <= len(data):
            tag, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", data, offset + 8)
            if tag == _EXTENSIBLE and size >= 26:
                tag = struct.unpack_from("<H", data, offset + 32)[0]  # the sub-format GUID's first field
            fmt = (tag, channels, rate, bits)
        elif chunk == b"data":
            if fmt is None:
                break
            return WavFormat(*fmt, data_offset=offset + 8)
        offset += 8 + size + (size & 1)
    raise invalid("the audio starts with a WAV header that is not whole in the first audio message "
                  "(or has no fmt chunk before its data chunk)")


def skip_wav_header(data: bytes, config: StreamConfig, encoding_field: str,
                    wav_required: str | None) -> bytes:
    """``data`` without a leading WAV header, after checking that the header agrees with the
    config. ``wav_required`` is the error message to raise when there is no header."""
    wav = parse_wav_header(data)
    if wav is None:
        if wav_required:
            raise invalid(wav_required)
        return data
    if wav.format_tag != _PCM or wav.bits != 16:
        raise invalid(f"the WAV header describes {wav.bits}-bit samples of format {wav.format_tag}; "
                      f"{encoding_field} supports 16-bit PCM only")
    if wav.sample_rate != config.sample_rate_hertz:
        raise invalid(f"config.sample_rate_hertz ({config.sample_rate_hertz}) must match the "
                      f"WAV header ({wav.sample_rate})")
    if wav.channels != config.channels:
        raise invalid(f"config.audio_channel_count ({config.channels}) must match the "
                      f"WAV header ({wav.channels})")
    return data[wav.data_offset:]


class AudioIntake:
    """Feeds a session one protocol message's audio bytes at a time: a WAV header at the start is
    checked and skipped, and samples split across messages are joined (neither protocol asks
    messages to hold whole samples). A partial sample left at the very end is dropped."""

    def __init__(self, session: Session, encoding_field: str, wav_required: str | None):
        self.session = session
        self.encoding_field = encoding_field
        self.wav_required = wav_required
        self._started = False
        self._partial = b""

    def feed(self, data: bytes) -> None:
        if not data:
            return
        config = self.session.config
        if not self._started:
            self._started = True
            data = skip_wav_header(data, config, self.encoding_field, self.wav_required)
        data = self._partial + data
        whole = len(data) - len(data) % config.frame_bytes
        self._partial = data[whole:]
        self.session.feed(data[:whole])


def whole_audio(data: bytes, config: StreamConfig, encoding_field: str, wav_required: str | None) -> bytes:
    """A unary request's audio: WAV header checked and skipped, whole samples only."""
    data = skip_wav_header(data, config, encoding_field, wav_required)
    return data[:len(data) - len(data) % config.frame_bytes]

"""Real PNG and WAV bytes from the standard library, for the offline stand-ins.

PNGs are written chunk by chunk (``zlib`` + ``struct``); WAVs with :mod:`wave`. The
stand-in speech encodes each byte of its text in the amplitude of a 10 ms tone, so
the stand-in transcriber can read it back: a round trip a test can check exactly.
"""

from __future__ import annotations

import io
import math
import struct
import wave
import zlib
from dataclasses import dataclass

__all__ = [
    "PngInfo",
    "WavInfo",
    "png_info",
    "process_pcm",
    "read_speech",
    "solid_png",
    "speech_wav",
    "wav_info",
    "write_wav",
]

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SAMPLE_RATE = 16_000
_FRAME = 160  # samples per byte: 10 ms at 16 kHz, four periods of a 400 Hz tone
_STEP = 100  # amplitude per byte value; 256 * 100 stays below 32767
_MARK = 32_000  # the amplitude of the first frame, which says "stand-in speech"


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def solid_png(width: int, height: int, top: bytes, bottom: bytes) -> bytes:
    """An 8-bit RGB PNG shading from colour ``top`` to ``bottom`` (3 bytes each)."""
    rows = []
    for y in range(height):
        t = y / max(1, height - 1)
        colour = bytes(round(a + (b - a) * t) for a, b in zip(top, bottom, strict=True))
        rows.append(b"\x00" + colour * width)  # filter type 0 for every row
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"".join(
        (
            _PNG_MAGIC,
            _chunk(b"IHDR", header),
            _chunk(b"IDAT", zlib.compress(b"".join(rows), 6)),
            _chunk(b"IEND", b""),
        )
    )


@dataclass(frozen=True, slots=True)
class PngInfo:
    width: int
    height: int
    bit_depth: int
    colour_type: int


def png_info(data: bytes) -> PngInfo | None:
    """The header of a PNG, or ``None`` when ``data`` is not one."""
    if len(data) < 33 or not data.startswith(_PNG_MAGIC) or data[12:16] != b"IHDR":
        return None
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    if not (0 < width <= 16_384 and 0 < height <= 16_384):
        return None
    return PngInfo(width, height, depth, colour)


def speech_wav(text: str, *, speed: float = 1.0) -> bytes:
    """Mono 16-bit WAV: a marker frame, then one tone frame per UTF-8 byte of ``text``.

    ``speed`` shortens or lengthens every frame, so the duration changes as a real
    voice's would; the transcriber scales back.
    """
    frame = max(40, round(_FRAME / speed) // 40 * 40)  # whole periods: the peak is exact
    samples: list[int] = []
    for level in (_MARK, *(_STEP * (b + 1) for b in text.encode())):
        samples.extend(round(level * math.sin(2 * math.pi * i / 40)) for i in range(frame))
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE)
        out.writeframes(struct.pack(f"<{len(samples)}h", *samples))
    return buffer.getvalue()


@dataclass(frozen=True, slots=True)
class WavInfo:
    channels: int
    sample_width: int
    rate: int
    frames: int

    @property
    def seconds(self) -> float:
        return self.frames / self.rate if self.rate else 0.0


def wav_info(data: bytes) -> tuple[WavInfo, bytes] | None:
    """The format and PCM frames of a WAV file, or ``None`` when it is not one."""
    try:
        with wave.open(io.BytesIO(data), "rb") as src:
            info = WavInfo(src.getnchannels(), src.getsampwidth(), src.getframerate(), 0)
            pcm = src.readframes(src.getnframes())
    except (wave.Error, EOFError, struct.error, ValueError):
        return None
    frames = len(pcm) // max(1, info.channels * info.sample_width)
    return WavInfo(info.channels, info.sample_width, info.rate, frames), pcm


def read_speech(info: WavInfo, pcm: bytes) -> str | None:
    """The text :func:`speech_wav` encoded, or ``None`` for any other audio."""
    if info.channels != 1 or info.sample_width != 2 or info.frames < 40:
        return None
    samples = struct.unpack(f"<{info.frames}h", pcm[: info.frames * 2])
    longest = min(len(samples), 4_000)  # a frame is at most 640 samples (speed 0.25)
    frame = next((n for n in range(40, longest + 1, 40) if _is_mark(samples, n)), None)
    if frame is None:
        return None
    data = bytearray()
    for start in range(frame, len(samples) - frame + 1, frame):
        level = max(abs(s) for s in samples[start : start + frame])
        value = round(level / _STEP) - 1
        if not 0 <= value <= 255:
            return None
        data.append(value)
    return data.decode("utf-8", errors="replace")


def _is_mark(samples: tuple[int, ...], frame: int) -> bool:
    peak = max(abs(s) for s in samples[:frame])
    after = samples[frame : frame + 40]
    return peak == _MARK and (not after or max(abs(s) for s in after) < _MARK)


def write_wav(info: WavInfo, pcm: bytes) -> bytes:
    """A WAV file of ``pcm`` in ``info``'s format."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(info.channels)
        out.setsampwidth(info.sample_width)
        out.setframerate(info.rate)
        out.writeframes(pcm)
    return buffer.getvalue()


def process_pcm(info: WavInfo, pcm: bytes, operation: str, gain_db: float) -> bytes:
    """16-bit PCM reversed, normalised to full scale, or scaled by ``gain_db``."""
    if info.sample_width != 2:
        raise ValueError("only 16-bit audio can be processed")
    count = len(pcm) // 2
    samples = list(struct.unpack(f"<{count}h", pcm[: count * 2]))
    if operation == "reverse":
        width = info.channels
        frames = [samples[i : i + width] for i in range(0, len(samples), width)]
        samples = [s for frame in reversed(frames) for s in frame]
    else:
        peak = max((abs(s) for s in samples), default=0)
        factor = 10 ** (gain_db / 20) if operation == "gain" else (32_767 / peak if peak else 1.0)
        samples = [max(-32_768, min(32_767, round(s * factor))) for s in samples]
    return struct.pack(f"<{len(samples)}h", *samples)

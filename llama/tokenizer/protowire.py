"""Just enough of the protobuf wire format to read and rewrite SentencePiece's model files.

protobuf itself is not a dependency: SentencePiece's ModelProto and SentencePieceText only need
varints, 32-bit floats and length-delimited fields. A message is kept as a list of
(field number, wire type, value) so that fields this module does not know are written back
unchanged.
"""

from __future__ import annotations

import struct

VARINT, FIXED64, LEN, FIXED32 = 0, 1, 2, 5
Field = tuple[int, int, int | bytes]


class ProtoError(ValueError):
    """Bytes that are not a well-formed protobuf message."""


def read_varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise ProtoError("truncated or overlong varint")
        b = buf[i]
        value |= (b & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if not b & 0x80:
            return value, i


def parse(buf: bytes) -> list[Field]:
    """The top-level fields of one message, in file order."""
    out: list[Field] = []
    i = 0
    while i < len(buf):
        key, i = read_varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == VARINT:
            value, i = read_varint(buf, i)
        elif wire in (FIXED32, FIXED64):
            size = 4 if wire == FIXED32 else 8
            value, i = int.from_bytes(buf[i : i + size], "little"), i + size
        elif wire == LEN:
            size, i = read_varint(buf, i)
            value, i = bytes(buf[i : i + size]), i + size
        else:
            raise ProtoError(f"unsupported wire type {wire} for field {number}")
        if i > len(buf):
            raise ProtoError(f"field {number} runs past the end of the message")
        out.append((number, wire, value))
    return out


def _put_varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int32 values are written as 10-byte varints
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        out.append(b | (0x80 if value else 0))
        if not value:
            return bytes(out)


def serialize(fields: list[Field]) -> bytes:
    out = bytearray()
    for number, wire, value in fields:
        out += _put_varint(number << 3 | wire)
        if wire == VARINT:
            out += _put_varint(int(value))
        elif wire in (FIXED32, FIXED64):
            out += int(value).to_bytes(4 if wire == FIXED32 else 8, "little")
        else:
            out += _put_varint(len(value)) + bytes(value)
    return bytes(out)


def string(number: int, text: str) -> Field:
    return (number, LEN, text.encode("utf-8"))


def varint(number: int, value: int) -> Field:
    return (number, VARINT, value)


def float32(number: int, value: float) -> Field:
    return (number, FIXED32, int.from_bytes(struct.pack("<f", value), "little"))


def message(number: int, fields: list[Field]) -> Field:
    return (number, LEN, serialize(fields))

"""
Tests for L{timtx.protocols.frames}.
"""

from twisted.trial.unittest import SynchronousTestCase

from timtx.protocols.codec import Encoding
from timtx.protocols.constants import ErrorCode, TimType
from timtx.protocols.errors import FrameTooLarge, TimProtocolError
from timtx.protocols.frames import (
    ClientFrame,
    LengthPrefixedDecoder,
    client_ack,
    client_frame,
    length_prefixed,
    parse_client_frame,
    parse_server_frame,
    server_frame,
)


class FrameLayoutTests(SynchronousTestCase):
    def test_clientFlagMeansJSON(self):
        """
        From a client, bit 0x80 of the first byte selects JSON.
        """
        self.assertEqual(parse_client_frame(b"\x90{}"), ClientFrame(16, Encoding.JSON, b"{}"))
        self.assertEqual(parse_client_frame(b"\x10\x00"), ClientFrame(16, Encoding.COMPACT, b"\x00"))
        self.assertEqual(client_frame(16, b"{}", Encoding.JSON), b"\x90{}")

    def test_serverFlagMeansAck(self):
        """
        From the server, bit 0x80 means a 4-byte ack id follows.
        """
        data = server_frame(TimType.TIMMESSAGE, b"payload", ackId=0x01020304)
        self.assertEqual(data, b"\xda\x01\x02\x03\x04payload")
        frame = parse_server_frame(data)
        self.assertEqual((frame.timType, frame.ackId, frame.payload), (90, 0x01020304, b"payload"))
        self.assertEqual(parse_server_frame(b"\x0d").ackId, None)

    def test_acks(self):
        """
        timgo acks with 0x0C, timjs with 0x8C; both carry the id.
        """
        self.assertEqual(client_ack(7), b"\x0c\x00\x00\x00\x07")
        self.assertEqual(client_ack(7, json=True), b"\x8c\x00\x00\x00\x07")
        self.assertEqual(parse_client_frame(b"\x8c\x00\x00\x00\x07extra").ackId(), 7)
        error = self.assertRaises(TimProtocolError, parse_client_frame(b"\x0c\x00").ackId)
        self.assertEqual(error.code, ErrorCode.ERR_FORMAT)

    def test_empty(self):
        self.assertRaises(TimProtocolError, parse_client_frame, b"")
        self.assertRaises(TimProtocolError, parse_server_frame, b"")
        self.assertRaises(TimProtocolError, parse_server_frame, b"\x8c\x00")


class LengthPrefixedDecoderTests(SynchronousTestCase):
    frames = [b"\x0d", b"\x10" + b"x" * 300, b"\x8cabcd", b"\x5a" + bytes(range(256))]

    def stream(self):
        return b"".join(length_prefixed(f) for f in self.frames)

    def drain(self, decoder):
        out = []
        while (frame := decoder.next_frame()) is not None:
            out.append(frame)
        return out

    def test_whole(self):
        decoder = LengthPrefixedDecoder(1024)
        decoder.feed(self.stream())
        self.assertEqual(self.drain(decoder), self.frames)
        self.assertEqual(decoder.buffered, 0)

    def test_byteByByte(self):
        decoder = LengthPrefixedDecoder(1024)
        out = []
        for byte in self.stream():
            decoder.feed(bytes([byte]))
            out.extend(self.drain(decoder))
        self.assertEqual(out, self.frames)

    def test_trailingData(self):
        """
        Bytes of the next frame stay buffered until it is whole.
        """
        decoder = LengthPrefixedDecoder(1024)
        stream = self.stream()
        decoder.feed(stream + stream[:3])
        self.assertEqual(self.drain(decoder), self.frames)
        self.assertEqual(decoder.buffered, 3)
        decoder.feed(stream[3:])
        self.assertEqual(self.drain(decoder), self.frames)

    def test_tooLarge(self):
        """
        A length prefix over the limit fails before the frame arrives.
        """
        decoder = LengthPrefixedDecoder(100)
        decoder.feed(b"\x00\x00\x00\x65")
        error = self.assertRaises(FrameTooLarge, decoder.next_frame)
        self.assertEqual((error.code, error.size, error.fatal), (ErrorCode.ERR_BIGDATA, 101, True))

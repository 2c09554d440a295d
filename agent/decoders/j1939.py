"""J1939 identifiers and the transport protocol (TP) that carries messages longer than 8 bytes.

GB/T 27930 uses connection-mode RTS/CTS between BMS and charger; a passive listener (the agent) also
accepts BAM. The reassembler survives what real buses do: aborts, lost or repeated packets, a new RTS
in the middle of a transfer, interleaved transfers from different sources, and silence (timeouts
measured on the frames' own timestamps, so recorded traffic decodes the same as live traffic).
Everything it drops is reported as a DecodeError with a reason, never raised.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from battery_trace.agent.readings import DecodeError

PGN_TP_CM = 0xEC00
PGN_TP_DT = 0xEB00
MAX_TP_SIZE = 1785
T1_SECONDS = 0.75  # longest wait between packets of one transfer
T2_SECONDS = 1.25  # longest wait for packets after a CTS


@dataclass(frozen=True)
class CanFrame:
    arbitration_id: int
    data: bytes
    timestamp: float = 0.0
    is_extended: bool = True


@dataclass(frozen=True)
class J1939Id:
    priority: int
    pgn: int
    source: int
    destination: int  # 0xFF for broadcast and for PDU2 messages

    @classmethod
    def parse(cls, arbitration_id: int) -> J1939Id:
        priority = (arbitration_id >> 26) & 0x7
        dp = (arbitration_id >> 24) & 0x1
        pf = (arbitration_id >> 16) & 0xFF
        ps = (arbitration_id >> 8) & 0xFF
        source = arbitration_id & 0xFF
        if pf < 240:  # PDU1: PS is the destination address, not part of the PGN
            return cls(priority, (dp << 16) | (pf << 8), source, ps)
        return cls(priority, (dp << 16) | (pf << 8) | ps, source, 0xFF)

    def to_id(self) -> int:
        pf = (self.pgn >> 8) & 0xFF
        ps = self.destination if pf < 240 else self.pgn & 0xFF
        return (self.priority << 26) | ((self.pgn >> 16) & 1) << 24 | pf << 16 | ps << 8 | self.source


@dataclass(frozen=True)
class Message:
    """A complete J1939 message: a single frame, or a reassembled TP transfer."""

    pgn: int
    source: int
    destination: int
    data: bytes
    timestamp: float


@dataclass
class _Transfer:
    pgn: int
    size: int
    packets: int
    broadcast: bool
    last_seen: float
    received: dict[int, bytes] = field(default_factory=dict)


class TransportReassembler:
    """Feeds on CAN frames; yields complete messages and the DecodeErrors of what it had to drop."""

    def __init__(self) -> None:
        self._transfers: dict[tuple[int, int], _Transfer] = {}

    def feed(self, frame: CanFrame) -> list[Message | DecodeError]:
        if not frame.is_extended:
            return [DecodeError("not_j1939", f"11-bit identifier 0x{frame.arbitration_id:03x}: not J1939")]
        ident = J1939Id.parse(frame.arbitration_id)
        out: list[Message | DecodeError] = self._expire(frame.timestamp)
        if ident.pgn == PGN_TP_CM:
            out.extend(self._control(ident, frame))
        elif ident.pgn == PGN_TP_DT:
            out.extend(self._data(ident, frame))
        else:
            out.append(Message(ident.pgn, ident.source, ident.destination, frame.data, frame.timestamp))
        return out

    def flush(self) -> list[DecodeError]:
        """At the end of a capture: every transfer still open is incomplete."""
        out = [
            DecodeError(
                "tp_incomplete",
                f"PGN 0x{t.pgn:04x} from 0x{key[0]:02x} ended with {len(t.received)}/{t.packets} packets",
            )
            for key, t in self._transfers.items()
        ]
        self._transfers.clear()
        return out

    def _expire(self, now: float) -> list[Message | DecodeError]:
        out: list[Message | DecodeError] = []
        for key, t in list(self._transfers.items()):
            if now - t.last_seen > (T2_SECONDS if not t.broadcast else T1_SECONDS):
                del self._transfers[key]
                out.append(
                    DecodeError(
                        "tp_timeout",
                        f"transfer of PGN 0x{t.pgn:04x} from 0x{key[0]:02x} timed out with "
                        f"{len(t.received)}/{t.packets} packets",
                    )
                )
        return out

    def _control(self, ident: J1939Id, frame: CanFrame) -> list[Message | DecodeError]:
        data = frame.data
        if len(data) < 8:
            return [DecodeError("tp_short", f"TP.CM frame of {len(data)} bytes; 8 expected")]
        control, pgn = data[0], int.from_bytes(data[5:8], "little")
        key = (ident.source, ident.destination)
        if control in (0x10, 0x20):  # RTS or BAM: a sender announces a transfer
            size, packets = int.from_bytes(data[1:3], "little"), data[3]
            if not 9 <= size <= MAX_TP_SIZE or packets != -(-size // 7):
                return [DecodeError("tp_bad_announce", f"announced {size} bytes in {packets} packets")]
            out: list[Message | DecodeError] = []
            if key in self._transfers:
                old = self._transfers[key]
                out.append(DecodeError("tp_restarted", f"new announcement while PGN 0x{old.pgn:04x} was in transfer"))
            broadcast = control == 0x20
            self._transfers[key] = _Transfer(pgn, size, packets, broadcast, frame.timestamp)
            return out
        if control == 0xFF:  # abort, from either side of the connection
            dropped = [k for k in (key, (ident.destination, ident.source)) if self._transfers.pop(k, None)]
            if dropped:
                return [DecodeError("tp_aborted", f"transfer of PGN 0x{pgn:04x} aborted (reason {data[1]})")]
            return []
        if control in (0x11, 0x13):  # CTS and end-of-message acknowledgement: the receiver's side
            transfer = self._transfers.get((ident.destination, ident.source))
            if transfer is not None:
                transfer.last_seen = frame.timestamp
            return []
        return [DecodeError("tp_unknown_control", f"TP.CM control byte 0x{control:02x}")]

    def _data(self, ident: J1939Id, frame: CanFrame) -> list[Message | DecodeError]:
        data = frame.data
        if len(data) < 2:
            return [DecodeError("tp_short", f"TP.DT frame of {len(data)} bytes")]
        key = (ident.source, ident.destination)
        transfer = self._transfers.get(key)
        if transfer is None:
            return [DecodeError("tp_orphan", f"TP.DT packet {data[0]} from 0x{ident.source:02x} with no transfer")]
        number = data[0]
        if not 1 <= number <= transfer.packets:
            return [DecodeError("tp_bad_sequence", f"packet {number} of a {transfer.packets}-packet transfer")]
        if number < transfer.packets and len(data) < 8:
            return [DecodeError("tp_short", f"packet {number} has {len(data) - 1} data bytes; 7 expected")]
        transfer.last_seen = frame.timestamp
        if number in transfer.received:
            return [DecodeError("tp_repeated", f"packet {number} received twice")]
        transfer.received[number] = data[1:8]
        if len(transfer.received) < transfer.packets:
            return []
        del self._transfers[key]
        payload = b"".join(transfer.received[i] for i in range(1, transfer.packets + 1))[: transfer.size]
        return [Message(transfer.pgn, ident.source, ident.destination, payload, frame.timestamp)]

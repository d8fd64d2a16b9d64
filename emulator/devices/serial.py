"""Serial port at 0x3F8: a transmitter whose bytes go to a sink (file, stdout, a notebook cell).

Mirrors the part of QEMU's hw/char/serial.c a polled guest uses: THR at +0, LSR at +5
(transmitter always empty).  Output is buffered and handed to the sink per line.
"""

from __future__ import annotations

from collections.abc import Callable

Sink = Callable[[bytes], None]


class Serial:
    name = "serial"
    version = 1
    ports = range(0x3F8, 0x400)

    def __init__(self, sink: Sink | None = None, keep: int = 1 << 20) -> None:
        self.sink = sink
        self.keep = keep
        self.history = bytearray()
        self._line = bytearray()

    def port_in(self, port: int, size: int) -> int:
        if port == 0x3FD:
            return 0x60  # THR empty, transmitter empty
        return 0

    def port_out(self, port: int, size: int, value: int) -> None:
        if port != 0x3F8:
            return
        b = value & 0xFF
        self._line.append(b)
        if b == 0x0A or len(self._line) >= 4096:
            self.flush()

    def flush(self) -> None:
        if not self._line:
            return
        data = bytes(self._line)
        self._line.clear()
        self.history += data
        if len(self.history) > self.keep:
            del self.history[: len(self.history) - self.keep]
        if self.sink is not None:
            self.sink(data)

    def text(self) -> str:
        self.flush()
        return self.history.decode("latin-1")

    def reset(self) -> None:
        self.flush()

    def save_state(self) -> bytes:
        return bytes(self._line)

    def prepare_state(self, data: bytes, version: int) -> Callable[[], None]:
        line = bytearray(data)

        def apply() -> None:
            self._line = line
        return apply

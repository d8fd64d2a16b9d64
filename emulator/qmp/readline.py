"""The human monitor on a character device: line editing and echo (QEMU's util/readline.c),
and the ``-monitor stdio`` loop around it (monitor/hmp.c ``monitor_read`` and
``monitor_command_cb``).

:class:`ReadlineState` is sans-IO: bytes in, the echo QEMU's readline would send and the
completed command lines out.  QEMU redraws the edited line after every key
(``readline_update``): the cursor goes back over the previous text (``ESC [ D`` per column),
the whole line is printed, then ``ESC [ K`` clears the rest; Enter sends a newline and hands
the line to the monitor.  That is the echo qemu-iotests filter with ``_filter_hmp``.  Output
lines end in ``\\r\\n``, as the monitor sends them.

:func:`serve_stdio` runs one monitor on file descriptors: the banner, the ``(qemu) `` prompt,
each command run when its line is complete (so its output follows its echo, as in QEMU where
the command runs before the next byte is read), and nothing more once a command stopped the
VM for good (``quit``).  Imports nothing of the QMP monitor; the caller hands it the command
runner.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

PROMPT = "(qemu) "
ESC_LEFT = "\033[D"
ESC_RIGHT = "\033[C"
ESC_CLEAR_EOL = "\033[K"
_BACKSPACE = (8, 127)
_ENTER = (10, 13)


def banner(version: str) -> str:
    """monitor_qmp_..._hmp's greeting (monitor/hmp.c monitor_event, CHR_EVENT_OPENED)."""
    return f"QEMU {version} monitor - type 'help' for more information\r\n"


@dataclass
class ReadlineState:
    """QEMU's ReadLineState, without history and completion: the line being edited and what
    the terminal last showed of it."""

    cmd_buf: str = ""
    cmd_buf_index: int = 0
    last_cmd_buf: str = ""
    last_cmd_buf_index: int = 0
    esc_state: int = 0  # 0: normal, 1: after ESC, 2: after ESC [

    def show_prompt(self) -> str:
        """readline_show_prompt(): the prompt, and a fresh line to edit."""
        self.last_cmd_buf = ""
        self.last_cmd_buf_index = 0
        return PROMPT

    def readline_update(self) -> str:
        """Redraw the line if it changed, then put the cursor where it belongs."""
        out = []
        if self.cmd_buf != self.last_cmd_buf:
            out.append(ESC_LEFT * self.last_cmd_buf_index)
            out.append(self.cmd_buf + ESC_CLEAR_EOL)
            self.last_cmd_buf = self.cmd_buf
            self.last_cmd_buf_index = len(self.cmd_buf)
        if self.cmd_buf_index != self.last_cmd_buf_index:
            delta = self.cmd_buf_index - self.last_cmd_buf_index
            out.append(ESC_RIGHT * delta if delta > 0 else ESC_LEFT * -delta)
            self.last_cmd_buf_index = self.cmd_buf_index
        return "".join(out)

    def readline_handle_byte(self, ch: int) -> tuple[str, str | None]:
        """One input byte: the echo to send, and the completed line (or None)."""
        if self.esc_state == 1:
            self.esc_state = 2 if ch == ord("[") else 0
            return "", None
        if self.esc_state == 2:
            self.esc_state = 0
            if ch == ord("D") and self.cmd_buf_index > 0:
                self.cmd_buf_index -= 1
            elif ch == ord("C") and self.cmd_buf_index < len(self.cmd_buf):
                self.cmd_buf_index += 1
            return self.readline_update(), None
        if ch in _ENTER:
            line, self.cmd_buf, self.cmd_buf_index = self.cmd_buf, "", 0
            return "\r\n", line
        if ch == 27:
            self.esc_state = 1
            return "", None
        if ch in _BACKSPACE:
            if self.cmd_buf_index > 0:
                i = self.cmd_buf_index
                self.cmd_buf = self.cmd_buf[:i - 1] + self.cmd_buf[i:]
                self.cmd_buf_index -= 1
        elif ch >= 32:
            i = self.cmd_buf_index
            self.cmd_buf = self.cmd_buf[:i] + chr(ch) + self.cmd_buf[i:]
            self.cmd_buf_index += 1
        else:
            return "", None
        return self.readline_update(), None


def serve_stdio(execute: Callable[[str], str], version: str, finished: Callable[[], bool],
                in_fd: int = 0, out_fd: int = 1) -> None:
    """The HMP monitor on ``in_fd``/``out_fd`` until end of input or until a command leaves
    ``finished()`` true (QEMU exits there; at end of input QEMU keeps running, and so does the
    caller).  ``execute`` runs one command line and returns its output."""
    rs = ReadlineState()

    def send(text: str) -> None:
        data = text.encode("utf-8", "replace")
        while data:
            data = data[os.write(out_fd, data):]

    send(banner(version) + rs.show_prompt())
    while True:
        try:
            chunk = os.read(in_fd, 4096)
        except OSError:
            return
        if not chunk:
            return
        for ch in chunk:
            echo, line = rs.readline_handle_byte(ch)
            if echo:
                send(echo)
            if line is None:
                continue
            out = execute(line)
            if finished():
                return
            send(out + rs.show_prompt())

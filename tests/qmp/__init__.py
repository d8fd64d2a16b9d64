"""QMP tests; :func:`negotiated` is the raw socket client the socket tests share."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any


def negotiated(path: Path) -> tuple[socket.socket, Any]:
    """A unix-socket QMP connection past the greeting and ``qmp_capabilities``: the socket
    and a binary file reading its lines."""
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(path))
    s.settimeout(60)
    f = s.makefile("rb")
    assert b"QMP" in f.readline()
    s.sendall(b'{"execute": "qmp_capabilities"}\n')
    assert json.loads(f.readline()) == {"return": {}}
    return s, f

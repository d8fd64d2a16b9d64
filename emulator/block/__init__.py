"""The block layer: qcow2 and raw format drivers, the file protocol, the node graph.

Mirrors QEMU's block/ directory.  Imports neither unicorn nor asyncio.
"""

from emulator.block.qcow2 import Qcow2Image
from emulator.block.snapshot import QCowSnapshot

__all__ = ["QCowSnapshot", "Qcow2Image"]

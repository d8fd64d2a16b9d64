"""The block layer: qcow2 and raw format drivers, the file protocol, the node graph.

Mirrors QEMU's block/ directory.  Imports neither unicorn nor asyncio.  Modules
inside the block layer import each other directly, never through this package.
"""

from emulator.block.qcow2 import Qcow2Image
from emulator.block.state import QCowSnapshot

__all__ = ["QCowSnapshot", "Qcow2Image"]

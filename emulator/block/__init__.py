"""The block layer: qcow2 and raw format drivers, the file protocol, the node graph.

Mirrors QEMU's block/ directory.  The package exports are the public block API (what
the lab and the README use): images, their snapshots, and the ``-blockdev`` graph.
Modules inside the block layer import each other directly, never through this package.
Imports neither unicorn nor asyncio.
"""

from emulator.block.node import BlockGraph
from emulator.block.qcow2 import Qcow2Image
from emulator.block.state import QCowSnapshot

__all__ = ["BlockGraph", "QCowSnapshot", "Qcow2Image"]

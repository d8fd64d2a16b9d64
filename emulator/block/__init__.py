"""The block layer: qcow2 and raw format drivers, the file protocol, the node graph.

Mirrors QEMU's block/ directory.  The package exports are the public block API (what
the lab and the README use): images, their snapshots, the ``-blockdev`` graph, and a host
file with its data extents (lab/diskfloor.py times reads of an image's data).
Modules inside the block layer import each other directly, never through this package.
Imports neither unicorn nor asyncio.
"""

from emulator.block.io import OsFile, data_extents
from emulator.block.node import BlockGraph
from emulator.block.qcow2 import Qcow2Image
from emulator.block.state import QCowSnapshot

__all__ = ["BlockGraph", "OsFile", "QCowSnapshot", "Qcow2Image", "data_extents"]

"""Migration: the VM state stream and the snapshot engines (QEMU's migration/)."""

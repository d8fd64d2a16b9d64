"""Notebook 10-two-ways: QEMU's background snapshot beside an internal snapshot"""

CELLS: list[tuple[str, str]] = [
    ("md", """# 10. Two ways to snapshot a running VM: an internal snapshot and QEMU's background snapshot

**Learning goals.** After this notebook you can
1. say what an internal snapshot (`snapshot-save`, HMP `savevm`) stores and where: the VM state inside the qcow2 image, past the end of the virtual disk, and a copy of every disk's L1 table;
2. say what a background snapshot (`migrate-set-capabilities background-snapshot` + `migrate`) stores and where: a migration stream of the VM state in a file of your choice, and *no* disk state;
3. compare the two on the same guest, on QEMU 7.2 and on snaplab: downtime, total time, and how much the guest kept running.

**Prerequisites.** Notebooks 3 (the OVMF varstore: which devices a snapshot covers), 4 (inside a qcow2 file: L1 tables, the VM-state area) and 7 (copy-on-write).

**What to look at.** The `qemu-img snapshot -l` listing after both operations, the file the background snapshot wrote, and the table of downtimes and progress.

Lab function used: `lab.two_ways.snapshot_two_ways`."""),
    ("md", """## The two mechanisms

*Internal snapshot.* QEMU's `save_snapshot()` (`migration/savevm.c`) stops the guest, writes the VM state (devices and every RAM page) into the qcow2 image's VM-state area (`bdrv_save_vmstate`: it lies past the end of the virtual disk, so the guest never sees it), creates a snapshot table entry on every disk (each keeps a copy of its L1 table; the clusters become shared and copy-on-write), then resumes. Everything is in the images; `qemu-img snapshot -l` lists it; `snapshot-load` (or `loadvm`) brings the whole VM back.

*Background snapshot* (QEMU 6.0, `background-snapshot` capability, by Andrey Gruzdev): `migrate` to a file with the guest running. QEMU write-protects all of RAM with userfaultfd at the start, sends pages in the background, and copies a page out before the guest's first write to it: the stream is the VM as it was at the start. The disks are *not* part of it: to restore you need the disks as they were at that instant from somewhere else (an external snapshot taken at the same moment), and `migrate-incoming` to load the stream.

snaplab implements both with QEMU's interface: the same QMP commands below run against QEMU 7.2 and against snaplab's machine, with the same guest program (the dirty workload; `emulator/qemu_guest.py` builds it for QEMU)."""),
    ("code", """import shutil
from lab.two_ways import snapshot_two_ways
SYSTEMS = ['snaplab'] + (['qemu'] if shutil.which('qemu-system-x86_64') else [])
print('systems:', SYSTEMS, '| guest: 128 MiB, the dirty workload at 50 MiB/s over 32 MiB, seed 1')"""),
    ("code", """# NBVAL_IGNORE_OUTPUT
results = {s: snapshot_two_ways(s, ram_mib=128, seed=1) for s in SYSTEMS}
print(f"{'system':>8} {'operation':>10} {'downtime ms':>12} {'total s':>8} {'guest progress':>15} {'stored':>22}")
for s, r in results.items():
    i, b = r['internal'], r['migrate']
    print(f"{s:>8} {'internal':>10} {i['downtime_ms']:12.2f} {i['total_s']:8.3f} {i['progress']:15.0%} {i['vmstate_bytes'] / 2**20:9.1f} MiB in qcow2")
    print(f"{s:>8} {'background':>10} {b['downtime_ms']:12.2f} {b['total_s']:8.3f} {b['progress']:15.0%} {b['file_bytes'] / 2**20:9.1f} MiB in a file")"""),
    ("md", """Read the table: the internal snapshot stops the guest for the whole save on both systems (its progress during the operation is a small fraction of its rate before); the background snapshot stops it only to arm the write protection, and the guest keeps most of its speed while the stream is written. QEMU's background stop also sends the device state; snaplab's holds only the CPU context, the device sections and one `UFFDIO_WRITEPROTECT` (`docs/deviations.md` 34)."""),
    ("code", """for s, r in results.items():
    print(f'--- {s}: qemu-img snapshot -l after both operations')
    print(r['snapshots'].strip().splitlines()[0])
    names = [line.split()[1] for line in r['snapshots'].strip().splitlines()[2:]]
    print('snapshots in the image:', names)
    print('the background snapshot left no snapshot in the image:', names == ['internal'])
    print('it wrote its stream to a file of its own:', r['migrate']['file_bytes'] > 0)"""),
    ("md", """Only the internal snapshot is in the image. The background snapshot's stream is a file beside it, and the disks it would need are wherever you put them. The internal snapshot's VM state is inside `disk0.qcow2`, past the end of its 1 GiB virtual disk: `qemu-img info` lists the snapshot with its VM-state size (`VM SIZE`), and the image's allocated size grew by about that much:"""),
    ("code", """# NBVAL_IGNORE_OUTPUT
for s, r in results.items():
    print(f"{s}: allocated {r['disk_allocated_bytes'] / 2**20:.1f} MiB for a VM state of {r['internal']['vmstate_bytes'] / 2**20:.1f} MiB")
    print('\\n'.join(line for line in r['disk_after'].splitlines() if 'snapshot' in line.lower() or 'internal' in line))"""),
    ("md", """## Exercises: predict, then measure

1. **A faster writer.** Predict how the background snapshot's guest progress changes on each system if the guest dirties 200 MiB/s instead of 50 (each first write to a page waits for that page, or on snaplab its 2 MiB chunk, to be copied). Run `snapshot_two_ways(s, rate_mib_s=200)`.
2. **What you need to restore.** List what a restore from the background snapshot's file needs that a `snapshot-load` of the internal one does not, and which QMP commands do each (`migrate-incoming`; `snapshot-load`).
3. **Bigger RAM.** Predict which of the four downtimes grow with RAM, then run `snapshot_two_ways(s, ram_mib=512)`."""),
    ("md", """<details><summary>Worked solutions (open after predicting)</summary>

1. More writes per second means more first writes to not-yet-copied memory during the save, so the guest waits more: its progress during the background snapshot drops on both systems. QEMU copies a 4 KiB page per fault; snaplab copies the whole 2 MiB chunk into a warm buffer (`docs/deviations.md` 38), so it takes fewer faults but each one copies more.
2. The internal snapshot has everything in the image: `snapshot-load` reverts the disks and loads the VM state. The background snapshot has only the VM state: you need disks at the same instant (QEMU 7.2 takes none; an external snapshot, `blockdev-snapshot-sync`, started at the same time is the usual answer), a VM started with `-incoming defer`, and `migrate-incoming` with the file.
3. The internal snapshots' downtimes grow with the RAM written (every non-zero page is written inside the stop); the background snapshots' stops grow much less: arming write protection is one call over all of RAM, and the pages are written after the guest resumed.
</details>"""),
]

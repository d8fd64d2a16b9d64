"""Notebook 04-inside-qcow2: 3b. Inside a qcow2 file"""

CELLS: list[tuple[str, str]] = [
    ("md", """# 4. Inside a qcow2 file: tables, refcounts, snapshots, and where the VM state lives

**Learning goals.** After this notebook you can
1. read a qcow2 header and find the L1 table, the refcount table and the snapshot table from it;
2. translate a guest (virtual) offset into a file offset through the L1 and L2 tables;
3. explain what a refcount of 2 and the `COPIED` flag mean for a snapshot, and what happens on the next guest write (copy-on-write at the cluster level);
4. find a snapshot's **VM state**: in clusters mapped by the snapshot's own L1 table at guest offsets *past the end of the virtual disk*;
5. read what `qemu-img check` reports when a refcount is wrong (an error against a leak), and say which damage `-r all` fixes in place and which makes it rebuild the whole refcount structure.

**Prerequisites.** Notebook 3 (internal snapshots, `qemu-img snapshot -l`). Hexadecimal.

**What to look at.** The header fields, the layout table (which cluster is what), the refcounts of data clusters before and after one write, and the first bytes at the VM-state offset.

**Reference.** QEMU's `docs/interop/qcow2.txt` (sections "Header", "Host cluster management", "Cluster mapping", "Snapshots"); summarised in docs/reference/qemu-internals.md section 5. Everything below is read with Python's `struct` by `lab.qcow2_view`, written from that text and independent of snaplab's driver, and checked against the real `qemu-img` 7.2.

**The image.** A 1 GiB qcow2 disk, written through snaplab's driver with `0x11` in its first cluster and `0x55` at 600 MiB, then one `snapshot-save` (with VM state) of a running 64 MiB guest running the `idle` workload, with 8 MiB of its RAM set to `0x5a` (so the VM state has a known size and the image has the same layout and sizes at every run; its dates and VM clock differ).

Lab functions used: `lab.qcow2_view.make_example`, `Qcow2View`, `qemu_img`, `write_through_driver`, `set_refcount`, `check_report`."""),
    ("code", """import tempfile
from pathlib import Path
from lab import qcow2_view as qv
work = Path(tempfile.mkdtemp(prefix='snaplab-nb-'))
path = qv.make_example(work)
v = qv.Qcow2View.open(path)
v.header"""),
    ("md", """The header (qcow2.txt "Header"): `QFI\\xfb` and version 3; `cluster_bits` 16, so clusters are 64 KiB; `size` is the virtual disk, 1 GiB; `refcount_order` 4, so refcounts are 16-bit; the L1 table, the refcount table and the snapshot table are at the offsets given, and there is `nb_snapshots` 1. Each L2 table is one cluster of 8-byte entries, so it maps 8192 clusters = 512 MiB, and a 1 GiB disk needs 2 L1 entries; `l1_size` says 3: the third is for the VM state (below)."""),
    ("code", """print(qv.qemu_img('--version').splitlines()[0])
print(qv.qemu_img('info', str(path)))"""),
    ("code", """for off, what in v.layout():
    print(f'{off:#10x}  refcount {v.refcount(off)}  {what}')
snap_l1_now = v.l1(v.snapshots()[0].l1_table_offset, v.snapshots()[0].l1_size)
data = [c['host_offset'] for c in v.mapped(v.l1())]
vmstate = [c['host_offset'] for c in v.mapped(snap_l1_now) if c['guest_offset'] >= v.header['size']]
print('data clusters (the active disk and the snapshot):', [hex(x) for x in data])
print(f'VM-state clusters: {len(vmstate)}, {hex(min(vmstate))}..{hex(max(vmstate) + v.cluster_size - 1)}')
print('free clusters (refcount 0) inside the file:', [hex(x) for x in v.free_clusters()])
print(f'file size {path.stat().st_size:#x}: {path.stat().st_size // v.cluster_size} clusters')"""),
    ("md", """Every metadata structure is a cluster with refcount 1. The clusters not in the table are data (two), VM state (one run of clusters) or **free**: refcount 0, inside the file. A free cluster was used and given back, or never used: qcow2 updates a table by writing a new copy elsewhere and then freeing the old one, so a save leaves a few behind, and the allocator hands them out again before it grows the file (free ones at the file's end stay until the file is trimmed). The snapshot has its **own** L1 table and, in snaplab, its own L2 tables; QEMU's snapshot would share the L2 tables with the active L1 (refcount 2) and copy one only when it is written. snaplab gives the active L1 fresh L2 copies at snapshot time instead (docs/deviations.md entry 2; exercise 3 shows QEMU's way on the same image)."""),
    ("code", """# the active L1: each entry = an L2 table's offset, bit 63 = COPIED
[hex(e) for e in v.l1()]"""),
    ("code", """# the data clusters the active L1 reaches, and their refcounts
[(c['guest_offset'] >> 20, hex(c['host_offset']), 'COPIED' if c['COPIED'] else 'shared', v.refcount(c['host_offset']))
 for c in v.mapped(v.l1())]"""),
    ("md", """**One lookup, step by step** (learning goal 2), for guest offset 600 MiB: the L1 index is the offset divided by what one L2 table maps (8192 clusters of 64 KiB = 512 MiB); the L2 index is the cluster number within that table; the L2 entry's bits 9-55 are the host offset of the data cluster (qcow2.txt "Cluster mapping"), and the offset within the cluster is added."""),
    ("code", """off = 600 << 20
cs = v.cluster_size
per_l2 = cs * (cs // 8)                        # guest bytes one L2 table maps: 512 MiB
l1_index, l2_index = off // per_l2, (off // cs) % (cs // 8)
l2_table = v.l1()[l1_index] & qv.OFFSET_MASK   # bits 9-55 (bit 63 is COPIED)
entry = v.u64s(l2_table + 8 * l2_index, 1)[0]
data_cluster = entry & qv.OFFSET_MASK
print(f'L1 index {l1_index} -> L2 table at {l2_table:#x}; L2 index {l2_index} -> entry {entry:#x} -> data cluster {data_cluster:#x}')
print('host offset', hex(data_cluster + off % cs), 'reads', v.read(data_cluster + off % cs, 4),
      '| the same as host_offset():', v.host_offset(off, v.l1()) == data_cluster + off % cs)"""),
    ("md", """Two data clusters, at guest offsets 0 and 600 MiB (listed in MiB), through two different L2 tables (600 MiB is in the second 512 MiB). Each has refcount **2**: the active disk and the snapshot both point to it, so the L2 entries do not carry `COPIED` (qcow2.txt: bit 63 is set only "if its refcount is exactly one"). A guest write to such a cluster must not change it in place."""),
    ("code", """snap = v.snapshots()[0]
print({k: getattr(snap, k) for k in ('entry_offset', 'l1_table_offset', 'l1_size', 'id', 'name', 'vm_state_size',
                                      'disk_size', 'entry_bytes')})
parts = qv.vmstate_parts(path)   # the engine's own count of what it wrote
print(parts)
print("the engine's byte count is the table entry's vm_state_size:", parts['vm_state_size'] == snap.vm_state_size)
print(qv.qemu_img('snapshot', '-l', str(path)))"""),
    ("md", """The snapshot table entry (qcow2.txt "Snapshot table entry"): its L1 table's offset and size, id `1`, name `snap1`, the VM-state size (the 64-bit field of the extra data, bytes 40-47) and the disk size (bytes 48-55); the entry takes 72 bytes: 40 fixed bytes, 24 bytes of extra data (the VM-state size, the disk size, and the icount at bytes 56-63, which QEMU writes too), the 1-byte id and the 5-byte name, and 2 bytes of padding to a multiple of 8. The date and the VM clock are in it too (left out of the dictionary above: they change at every run; `qemu-img snapshot -l` prints both). `qemu-img snapshot -l` reads the same entry (its `VM SIZE` is this byte count in binary units). snaplab's VM state is the non-zero RAM pages (the zero pages are not stored; QEMU's stream sends every page, a zero page as its 8-byte page header with the zero flag and one byte: docs/deviations.md entries 23 and 33): the 2048 pages of `0x5a` **and** a few pages the guest itself made non-zero (its code, its stack, the lab device's page; emulator/guest.py), counted separately above; then the page bitmap, one bit per page of the 64 MiB of RAM (2 KiB, docs/deviations.md entry 23); and what remains is the stream's framing, the CPU and the devices, and padding: the RAM pages start on a cluster boundary of the stream (64 KiB here; docs/deviations.md entry 39), so the header, the device sections and the bitmap fill the first cluster and the rest of it is padding, most of that remainder. It is counted as what is left, so the parts add up by construction; what the check printed shows is that the engine's own count of the bytes it wrote is the size the snapshot table stores.

## Where the VM state lives

QEMU puts the VM state at the guest offset of the first L1 entry past the disk: `qcow2_vm_state_offset = l1_vm_state_index << (cluster_bits + l2_bits)` (block/qcow2.h; docs/reference/qemu-internals.md section 5). An L2 table of 64 KiB clusters holds 8192 entries and maps 512 MiB, so `l1_vm_state_index` is the disk size rounded up to a multiple of 512 MiB, in L1 entries (`size_to_l1`). For a 1 GiB disk that is L1 index 2, guest offset 1 GiB: just past the end of the disk, where no guest write can reach; a disk of 1.2 GiB would have its VM state at 1.5 GiB."""),
    ("code", """snap_l1 = v.l1(snap.l1_table_offset, snap.l1_size)
vm_off = v.vm_state_offset()
per_l1 = v.cluster_size * (v.cluster_size // 8)   # guest bytes one L2 table maps (512 MiB here)
print('VM state at guest offset', hex(vm_off), '= the disk size rounded up to a whole L2 table:',
      vm_off == -(-v.header['size'] // per_l1) * per_l1)
print('snapshot L1:', [hex(e) for e in snap_l1])
print('active L1 entry for the VM state:', hex(v.l1()[vm_off // per_l1]))
host = v.host_offset(vm_off, snap_l1)
print('first bytes there:', v.read(host, 4))
clusters = [c for c in v.mapped(snap_l1) if c['guest_offset'] >= vm_off]
print('VM-state clusters:', len(clusters), '; enough for vm_state_size:', len(clusters) * v.cluster_size >= snap.vm_state_size)"""),
    ("md", """The snapshot's L1 has a third entry, an L2 table that maps the VM state; the active L1's third entry is 0. The snapshot's entries carry bit 63 (`COPIED`), though the paragraph on the two data clusters above said it means "refcount exactly one": qcow2.txt says of the L1's flag that "this information is only accurate in the active L1 table". A snapshot's L1 is a copy of the active one taken as it was, flags included (QEMU's too); here the snapshot's L2 tables happen to have refcount 1, since snaplab gave the active L1 new ones. Through it, the first bytes at the VM-state offset are `QEVM`, the magic of the VM-state stream (QEMU's framing; snaplab's stream inside it is its own, docs/deviations.md entry 23). The VM state is stored exactly like disk contents, only at offsets the guest's disk never reaches (qcow2.txt, snapshot table entry bytes 32-35: "VM state is stored like guest disk content, except that it is stored at offsets that are larger than the virtual disk presented to the guest").

How did the VM state get into the snapshot's L1? In three steps, on QEMU as here: the save writes the stream through the *active* L1, at `qcow2_vm_state_offset` (allocating L2 tables and clusters as any write would); creating the snapshot copies the active L1, so the snapshot's L1 maps those clusters too; then the VM state is taken out of the active image (`save_snapshot` in migration/savevm.c: docs/reference/qemu-internals.md section 3.2, steps 8 and 9; `qcow2_snapshot_create`, section 5). QEMU takes it out so: "The VM state isn't needed any more in the active L1 table; in fact, it hurts by causing expensive COW for the next snapshot" (block/qcow2-snapshot.c `qcow2_snapshot_create`, reference section 5). It does so with a discard that, on a version 3 image, marks each L2 entry of the VM state `QCOW_OFLAG_ZERO` (bit 0 of a standard L2 entry: the cluster reads as zeros; `qcow2_cluster_discard` with `full_discard` false); that L2 table is shared with the snapshot, so marking it copies it first, and QEMU's active L1 keeps a non-zero third entry: a private L2 table (`COPIED`) whose VM-state entries all read as zeros (recorded on QEMU 7.2, not in this run: after a `snapshot-save` on a 1 GiB disk whose VM state took 1565 clusters, 98 MiB, the active L1 was `[0x0, 0x0, 0x8000000006240000]` and that L2's 1565 entries all `0x1`; docs/deviations.md entry 2). snaplab's active entry is 0, printed above: no L2 table at all. Both read as zeros from the active image, and `qemu-img check` finds both clean (docs/deviations.md entry 2)."""),
    ("code", """print(qv.qemu_img('check', str(path)))"""),
    ("md", """`qemu-img check` recomputes every refcount from the L1/L2 tables of the active image and of every snapshot and compares it with the refcount blocks (QEMU's block/qcow2-refcount.c, `qcow2_check_refcounts`): no errors, no leaks.

## When a refcount is wrong

Refcounts are redundant: everything they say can be recounted from the tables, and that recount is what a check does. The two data clusters above have refcount 2 (the active disk and the snapshot). Below, a copy of the image gets two wrong refcounts, written straight into its refcount block by `set_refcount` (no driver involved): the cluster at guest offset 0 gets **1**, the one at 600 MiB gets **3**. Predict what a check calls each, before running it. Both checks run: QEMU 7.2's `qemu-img` and snaplab's `snaplab-img` (its own code, `emulator/block/check.py`, which counts in QEMU's order)."""),
    ("code", """import shutil
bad = work / 'bad.qcow2'
shutil.copy(path, bad)
d0, d600 = (c['host_offset'] for c in v.mapped(v.l1()))
qv.set_refcount(bad, d0, 1)
qv.set_refcount(bad, d600, 3)
for tool in ('qemu-img', 'snaplab-img'):
    print(qv.check_report(tool, bad))"""),
    ("md", """The two tools print the same lines and exit with 2 (corruption). A refcount **lower** than the references is an `ERROR`: the driver would free the cluster at its next decrement (the active disk's next write to it, say) while the snapshot still points to it, and a later allocation would write new data over the snapshot's. The cluster with refcount 1 also breaks the `COPIED` rule (an L2 entry carries the flag exactly when the refcount is 1), so a second error is reported for its L2 entry. A refcount **higher** than the references is a leak: the cluster can never be freed, which wastes space but harms no data (exit 3 when leaks are all there is: qemu-img(1), the exit codes of `check`). `-r all` repairs both in place, each refcount set to what was counted. The repair below reports 1 corruption, not 2: the `COPIED` error is a consequence of the refcount, not a second fault on disk, and once cluster 5's refcount is back to 2 the flag-less L2 entry is right again (QEMU checks the flags after the refcounts, in `check_oflag_copied` of block/qcow2-refcount.c). Below, each tool repairs its own copy of the damaged image; each result is then checked by the real `qemu-img`, and the two repaired files are compared byte for byte:"""),
    ("code", """fixed = work / 'fixed.qcow2'
shutil.copy(bad, fixed)
print(qv.check_report('snaplab-img', fixed, '-r', 'all'))
print(qv.check_report('qemu-img', fixed))
fixed_q = work / 'fixed-by-qemu.qcow2'
shutil.copy(bad, fixed_q)
print(qv.check_report('qemu-img', fixed_q, '-r', 'all').splitlines()[0], '...')
print(qv.check_report('qemu-img', fixed_q).splitlines()[:2])
print('the two repaired files are the same bytes:', fixed.read_bytes() == fixed_q.read_bytes())"""),
    ("md", """A refcount of **0** on a cluster that is referenced is treated differently: QEMU's check does not patch it in place but marks the whole refcount structure for a rebuild (`compare_refcounts` in block/qcow2-refcount.c: a stored refcount of 0 sets `rebuild`), and snaplab's does the same. One reason to be careful: such a cluster looks free to the allocator, and raising its refcount in place may need a new refcount block, which the allocator could place on a free-looking cluster, this one included. `-r leaks` refuses (`ERROR need to rebuild refcount structures`, exit 1, nothing written) and `-r all` rebuilds the whole refcount structure from the recount (`Rebuilding refcount structure`). QEMU writes the new table and blocks into the first free clusters and then repairs the old ones as leaks; snaplab writes them after the end of the file and switches to them with one header write, so a crash half-way leaves the old image (docs/deviations.md entries 64 and 65). Exercise 4 does it with snaplab's tool, and shows QEMU's refusal of `-r leaks` on the same damage.

## Exercises: predict, then measure

1. **One guest write.** Write `0x22` over the first cluster of the disk (through snaplab's driver). Predict: the refcount of the old data cluster, whether the active L2 entry now points elsewhere, and the `COPIED` flag of the new entry.
2. **A second write to the same cluster.** Predict whether a second write allocates again.
3. **QEMU's own snapshot of the same image.** Copy the image, create a disk-only snapshot with `qemu-img snapshot -c`, and predict the refcount of the active L2 tables afterwards.
4. **A referenced cluster with refcount 0.** On a fresh copy of the original image, set the refcount of the data cluster at guest offset 0 to 0. Predict the exit codes of `check -r leaks` and then `check -r all`, and whether the file grows, and by how much (the layout cell printed where the file ends and which clusters are free)."""),
    ("code", """v.close()
qv.write_through_driver(path, 0, b'\\x22' * 65536)
v = qv.Qcow2View.open(path)
old = v.mapped(v.l1(snap.l1_table_offset, snap.l1_size))[0]
new = v.mapped(v.l1())[0]
print('old cluster', hex(old['host_offset']), 'refcount now', v.refcount(old['host_offset']))
print('active entry moved:', new['host_offset'] != old['host_offset'], '| new refcount', v.refcount(new['host_offset']),
      '| COPIED', new['COPIED'])
print('snapshot still reads 0x11:', v.read(old['host_offset'], 4), '| active reads:', v.read(new['host_offset'], 4))"""),
    ("code", """before = len(v.refcounts()), v.mapped(v.l1())[0]['host_offset']
v.close()
qv.write_through_driver(path, 0, b'\\x33' * 65536)
v = qv.Qcow2View.open(path)
print('clusters in use unchanged by the second write:', len(v.refcounts()) == before[0])
print('the data stayed at the same host offset:', v.mapped(v.l1())[0]['host_offset'] == before[1], '| reads:', v.read(before[1], 4))
print(qv.qemu_img('check', str(path)).splitlines()[0])"""),
    ("code", """qpath = work / 'qemu-copy.qcow2'
shutil.copy(path, qpath)
print(repr(qv.qemu_img('snapshot', '-c', 'byqemu', str(qpath))))
q = qv.Qcow2View.open(qpath)
print('active L2 tables and their refcounts:', [(hex(e & qv.OFFSET_MASK), q.refcount(e & qv.OFFSET_MASK)) for e in q.l1() if e & qv.OFFSET_MASK])
print(qv.qemu_img('check', str(qpath)).splitlines()[0])
q.close()"""),
    ("code", """zero = work / 'zero.qcow2'
shutil.copy(fixed, zero)  # clean again, and laid out as the original was before exercise 1's writes
qv.set_refcount(zero, d0, 0)
zq = work / 'zero-qemu.qcow2'
shutil.copy(zero, zq)
print(qv.check_report('qemu-img', zq, '-r', 'leaks'))   # QEMU's answer to the same damage (it writes nothing either)
def ends(p):                    # (file size, the image end offset qemu-img reports), in clusters
    end = [ln for ln in qv.qemu_img('check', str(p)).splitlines() if ln.startswith('Image end offset')][0]
    return p.stat().st_size // 65536, int(end.split()[-1]) // 65536
before = ends(zero)
z = qv.Qcow2View.open(zero)
tail = [x // 65536 for x in z.free_clusters() if x >= before[1] * 65536]
z.close()
print(qv.check_report('snaplab-img', zero, '-r', 'leaks'))
print(qv.check_report('snaplab-img', zero, '-r', 'all'))
after = ends(zero)
print(f'file size {before[0]} -> {after[0]} clusters, image end {before[1]} -> {after[1]} clusters '
      f'(free clusters at the tail of the file before the repair: {len(tail)})')
print(qv.check_report('qemu-img', zero).splitlines()[1])"""),
    ("md", """<details><summary>Worked solutions</summary>

1. The cluster was shared (refcount 2), so the write is **copy-on-write at the cluster level**: a new cluster is allocated for the active disk (refcount 1, `COPIED` set, so later writes go in place), the active L2 entry points to it, and the old cluster's refcount drops to **1**: only the snapshot uses it now, and it still holds `0x11`.
2. **No** new cluster: the entry is `COPIED` (refcount 1), so the second write goes in place: the number of clusters in use is unchanged, the data cluster is at the same host offset and now reads `0x33` (a write to a new cluster and a free of the old one would also keep the count, but not the offset), and `qemu-img check` stays clean.
3. QEMU's `qemu-img snapshot -c` copies only the L1 table and raises the refcount of everything it reaches, so the active L1's **L2 tables now have refcount 2**: shared with the new snapshot until the next write to each, which then copies that L2 table. snaplab avoids that first-write copy by giving the active L1 its own L2 tables at snapshot time (docs/deviations.md entry 2). Both images are valid for `qemu-img check`.
4. `-r leaks` exits **1** and writes nothing: a referenced cluster with refcount 0 means the refcount structure must be rebuilt, which only `-r all` may do. `-r all` then exits **0** after `Rebuilding refcount structure`: a new refcount table and block are written after the old end of the *file*, not after the last used cluster: the image end offset moves past the free clusters at the file's tail and the two new clusters (printed: the file grows by those two), while the old table and block, now unreferenced, stay inside it as free clusters; the real `qemu-img check` finds the result clean. QEMU refuses `-r leaks` with the same words. QEMU's own `-r all` would have reused free clusters inside the file instead (docs/deviations.md entry 65).
</details>"""),
    ("code", """v.close()
shutil.rmtree(work)"""),
]

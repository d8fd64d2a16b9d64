"""Notebook 03-ovmf-varstore: 3. The OVMF varstore problem"""

CELLS: list[tuple[str, str]] = [
    ("md", """# 3. The OVMF varstore problem: which devices, and where the VM state goes

**Learning goals.** After this notebook you can
1. explain why HMP `savevm` fails on a machine with a *raw* writable firmware variable store (like OVMF's `OVMF_VARS.fd`);
2. explain how QMP's `snapshot-save` avoids it by naming the devices (`devices`) and the one that receives the VM state (`vmstate`);
3. read `info snapshots` completely, including its second list, and find **where the VM state went**: which image holds it;
4. predict where HMP `savevm` puts the VM state when the variable store is qcow2.

**Prerequisites.** Notebooks 1 and 2 (block nodes, QMP jobs, HMP through `human-monitor-command`).

**Words.** *pflash*: the emulated parallel flash chip a PC's firmware lives in; QEMU's `-machine pflash0=...,pflash1=...` names the block nodes behind its two banks, code (read-only) and variables (writable). *OVMF*: the UEFI firmware for QEMU's virtual machines; its variable store `OVMF_VARS.fd` is a raw file. This lab's machine cannot run OVMF: it runs snaplab's own small firmware with an OVMF-like variable store in the same place (`data/firmware/`, `docs/deviations.md` 12). *BlockBackend*: the name QEMU gives a device's attachment to a block node (none for a `-blockdev` + `-device` disk, hence the empty `''` below). *Protocol node / format node*: the file node (`driver: file`) and the qcow2 or raw node on top of it.

**What to look at.** The error text of HMP `savevm`; the two lists of `info snapshots`; the `VM SIZE` column of `qemu-img snapshot -l` for each image.

**Background.** A snapshot is taken of every device you include, and a qcow2 image keeps its snapshots inside itself; raw images cannot hold any. HMP `savevm` includes every writable block device and writes the VM state (RAM, CPU, devices) to the first one that can hold snapshots (migration/savevm.c `save_snapshot` with no device list: `bdrv_all_can_snapshot`, `bdrv_all_find_vmstate_bs`; docs/reference/qemu-internals.md section 3). The 2020 QMP series gave the reason plainly: "the semantics around choice of disks were ill-defined", and made the new commands "require the caller to be explicit about all the block device nodes used in the snapshot operations, with no built-in default heuristics in use" ([PATCH v4 9/9], 2020-09-15, see notebook 2).

Lab functions used: `lab.session.default_machine` (`varstore='raw'` or `'qcow2'`), `lab.qcow2_view.qemu_img` (runs the real `qemu-img`)."""),
    ("md", """## A raw variable store"""),
    ("code", """from lab.session import default_machine, wait_for_serial
from lab.qcow2_view import qemu_img

raw = default_machine(ram_mib=64, varstore='raw')
raw.machine.start()
wait_for_serial(raw.machine, 'BootCount: 1\\n')  # the firmware has counted this boot in its store
q = raw.machine.qmp()
# the block nodes: the firmware's code (read-only) and variables (writable, raw), and the disk
for n in q.execute('query-named-block-nodes'):
    print(f"{n['node-name']:>10}: driver {n['drv']:<6} read-only {n['ro']}")
print(q.hmp('savevm snap1'))"""),
    ("md", """HMP refused: the variable store `fw-vars` is writable, so `savevm` must include it, and as a raw image it cannot hold a snapshot. The firmware's code image (`fw-code`, printed above) is raw too, but read-only: `savevm` leaves read-only nodes out (docs/reference/qemu-internals.md section 3.5), so it does not block anything. QEMU 7.2 answers with the same text (docs/reference/qemu-7.2-qmp.md section 5.1). Nothing can be snapshotted with HMP on such a machine, although the disk could hold a snapshot perfectly well.

QMP names what to include. Only `disk0`, which also receives the VM state:"""),
    ("code", """vars_fd = raw.workdir / 'vars.fd'
at_save = vars_fd.read_bytes()   # the raw store's file as the snapshot finds it
q.execute('snapshot-save', {'job-id': 'j1', 'tag': 'snap1', 'vmstate': 'disk0', 'devices': ['disk0']})
q.wait_job('j1')"""),
    ("code", """# including the raw variable store fails the same way as HMP did, but as job data
q.execute('snapshot-save', {'job-id': 'j2', 'tag': 'snap2', 'vmstate': 'disk0', 'devices': ['disk0', 'fw-vars']})
q.wait_job('j2')['error']"""),
    ("code", """print(q.hmp('info snapshots'))
print(qemu_img('snapshot', '-U', '-l', str(raw.workdir / 'disk0.qcow2')))"""),
    ("md", """`info snapshots` has **two lists**. The first, "present on all disks", holds the snapshots that **every** writable device has, whether or not it can hold snapshots at all (QEMU walks all of them with `bdrv_all_has_snapshot`, as `savevm` checks all of them with `bdrv_all_can_snapshot`); the raw variable store is writable and can have none, so that list is empty, and stays empty on this machine whatever is saved. The second, "partial (non-loadable)", holds those only some devices have, here `snap1`. QEMU prints one such list per image that can hold snapshots (`hmp_info_snapshots` walks them), here only `disk0`, and heads each with its device's BlockBackend name (`bdrv_get_device_name`); disks attached with `-blockdev` and `-device`, as on this lab's command line, have none, so the heading ends `on ''` (QEMU 7.2 prints the same: its transcript of a two-disk machine, "HMP info snapshots" in docs/reference/qemu-7.2-qmp.md section 6, has two lists, both headed `on ''`). `qemu-img` reads the disk image itself and finds `snap1` there with a non-zero `VM SIZE`: the VM state went into `disk0`, as `vmstate` said."""),
    ("md", """**What becomes of the variable store's contents.** `fw-vars` was not in `devices`, so no snapshot of it exists anywhere (a raw image cannot hold one). Its *contents* are in the VM state all the same: QEMU migrates a pflash device's storage as RAM (hw/block/pflash_cfi01.c registers it with `vmstate_register_ram`), and after a load it writes the restored contents back to the file (`pflash_post_load` has the whole flash written, `pflash_update`, when the VM runs again; docs/deviations.md 60 reports the file's hash after a load equal to its hash at the save on QEMU 7.2, a measurement whose transcript is not among docs/reference's). snaplab's flash device saves its writable bank in its section too, and a load writes back the 4 KiB sectors that differ, inside its stop (the same entry). snaplab's firmware keeps a boot counter as a variable (`BootCount`: OVMF has no such counter; it stands here for any variable a firmware writes at boot), so watch it: a reset makes the firmware count one more boot and write the store; loading `snap1` puts the file back; the next boot counts the same number again."""),
    ("code", """from emulator.varstore import boot_count

print('BootCount in vars.fd at the save:', boot_count(at_save))
q.execute('system_reset')
wait_for_serial(raw.machine, 'BootCount: 2\\n')
print('after a reset:', boot_count(vars_fd.read_bytes()))
q.execute('snapshot-load', {'job-id': 'l1', 'tag': 'snap1', 'vmstate': 'disk0', 'devices': ['disk0']})
print('load error:', q.wait_job('l1').get('error'))
print('after loading snap1:', boot_count(vars_fd.read_bytes()), '; the file as at the save:', vars_fd.read_bytes() == at_save)
q.execute('system_reset')
text = wait_for_serial(raw.machine, 'BootCount: 2\\n', count=2)
print([line for line in text.splitlines() if line.startswith('BootCount')])"""),
    ("md", """The file went from 1 to 2 with the reset, back to 1 with the load (byte for byte the file at the save), and the next boot counted 2 again. What a raw `OVMF_VARS.fd` costs is therefore not the variables' contents but the snapshots: HMP cannot snapshot the machine at all, and the store has no snapshot of its own, so nothing outside the VM state covers it (`qemu-img snapshot -a` applied to the disk offline, or a disk-only snapshot, leaves the store as it is)."""),
    ("code", """raw.close()"""),
    ("md", """## A qcow2 variable store

Converting the variable store to qcow2 (QEMU 7.2 accepted it for pflash: docs/reference/qemu-7.2-qmp.md section 2) makes HMP `savevm` work again. Where does the VM state go now?"""),
    ("code", """q2s = default_machine(ram_mib=64, varstore='qcow2')
q2s.machine.start()
q2 = q2s.machine.qmp()
import time; time.sleep(0.5)   # let the workload write some RAM first
print(repr(q2.hmp('savevm snap1')))
print(q2.hmp('info snapshots'))"""),
    ("code", """for image in ('vars.qcow2', 'disk0.qcow2'):
    print(image, qemu_img('snapshot', '-U', '-l', str(q2s.workdir / image)))"""),
    ("md", """`snap1` is now "present on all disks", and `qemu-img` shows where the VM state went: into **`vars.qcow2`**, the variable store (non-zero `VM SIZE`), while `disk0.qcow2` got a disk-only snapshot (`0 B`). HMP took the first snapshot-capable device it found (`bdrv_all_find_vmstate_bs`, walking the devices' block backends in the order they were made: the flash's with the machine, the disk's by its later `-device`), so the flash comes before the disk. A 128 KiB firmware image now holds megabytes of RAM contents, past the end of its virtual size (notebook 4 shows how a qcow2 image stores VM state past the end of the disk).

QEMU 7.2 does the same: "HMP savevm put the vmstate on the first snapshot-capable node, which was the qcow2 varstore `fw-vars`" (docs/reference/qemu-7.2-qmp.md section 5.2). libvirt hit the consequence: its own choice of the VM-state device differed from QEMU's "on VMs with UEFI firmware with NVRAM image in qcow2 format", so it switched to `snapshot-load` (libvirt commit 2ed93e1a, "qemu: monitor: Add monitor infrastructure for 'snapshot-load' QMP command", Peter Krempa).

With QMP the caller decides: include the variable store in `devices`, and put the VM state on the disk:"""),
    ("code", """q2.execute('snapshot-save', {'job-id': 'j', 'tag': 'snap2', 'vmstate': 'disk0', 'devices': ['disk0', 'fw-vars']})
print(q2.wait_job('j').get('error'))
for image in ('vars.qcow2', 'disk0.qcow2'):
    print(image, qemu_img('snapshot', '-U', '-l', str(q2s.workdir / image)))"""),
    ("md", """`snap2` has its VM state on `disk0.qcow2`, and a disk-only snapshot of the variable store: both devices are covered, and the big state sits where the operator wants it.

**`VM SIZE` in `info snapshots`.** The list "present on all disks" gives one `VM SIZE` per snapshot, read from the first snapshot-capable image, here `vars.qcow2`: so `snap2`, whose VM state is on `disk0`, shows `0 B` there although it is complete (exercise 4 asks what HMP `loadvm snap2` makes of that).

What is QEMU's and what is snaplab's here: every error text and every choice of where the VM state goes above is QEMU 7.2's. The `VM SIZE` values are not comparable with QEMU's transcript (36.5 MiB in docs/reference/qemu-7.2-qmp.md section 5.2): that guest had 256 MiB of RAM, booted OVMF and had two disks, this one has 64 MiB and runs snaplab's firmware and workload, so what is non-zero in RAM differs; both systems store a zero page without its 4 KiB (QEMU writes a few bytes of header for it, snaplab a bit in a bitmap: docs/deviations.md 23 and 57). snaplab also writes the restored variable store inside the load's stop, where QEMU writes it when the VM runs again (entry 60), and it names a read-only node "read-only" where QEMU calls it "writable" (entry 21), which does not arise in this notebook."""),
    ("md", """## Exercises: predict, then measure

1. **File size.** The variable store's virtual size is 128 KiB. After `snap1` (HMP) and `snap2` (QMP), predict how big `vars.qcow2` is as a file, in MiB, from the `VM SIZE` column of its snapshots above.
2. **VM state on the varstore on purpose.** Save `snap3` with `vmstate: 'fw-vars'` and `devices: ['disk0', 'fw-vars']`. Predict which image shows a non-zero `VM SIZE` for `snap3`.
3. **A partial snapshot.** Save `snap4` on `devices: ['disk0']` only. Predict in which list of `info snapshots` it appears, and what HMP `loadvm snap4` answers.
4. **A complete snapshot that HMP cannot load.** `snap2` is on both images, its VM state on `disk0`. Predict what HMP `loadvm snap2` answers (which image does HMP look in for the VM state?), and the VM's state after it."""),
    ("code", """import os
st = os.stat(q2s.workdir / 'vars.qcow2')
used = st.st_blocks * 512   # what the file system allocated (du)
print(f'vars.qcow2: {used / 2**20:.1f} MiB allocated (du); {st.st_size / 2**20:.1f} MiB apparent size (ls -l)')
print(qemu_img('snapshot', '-U', '-l', str(q2s.workdir / 'vars.qcow2')))
print('more than its 128 KiB of variables by over 1 MiB:', used > (128 << 10) + (1 << 20))"""),
    ("code", """q2.execute('snapshot-save', {'job-id': 'j3', 'tag': 'snap3', 'vmstate': 'fw-vars', 'devices': ['disk0', 'fw-vars']})
print(q2.wait_job('j3').get('error'))
for image in ('vars.qcow2', 'disk0.qcow2'):
    line = [l for l in qemu_img('snapshot', '-U', '-l', str(q2s.workdir / image)).splitlines() if ' snap3 ' in l][0]
    print(image, '-> VM SIZE', ' '.join(line.split()[2:4]))"""),
    ("code", """q2.execute('snapshot-save', {'job-id': 'j4', 'tag': 'snap4', 'vmstate': 'disk0', 'devices': ['disk0']})
print(q2.wait_job('j4').get('error'))
print(q2.hmp('info snapshots'))
print(repr(q2.hmp('loadvm snap4')))
print('status after the failed loadvm:', q2.execute('query-status')['status'])
q2.execute('snapshot-load', {'job-id': 'l4', 'tag': 'snap4', 'vmstate': 'disk0', 'devices': ['disk0']})
print('QMP snapshot-load of snap4 on disk0:', q2.wait_job('l4').get('error'))
print('status after the QMP load:', q2.execute('query-status')['status'])
q2.execute('cont')
print('status after cont:', q2.execute('query-status')['status'])"""),
    ("code", """print(repr(q2.hmp('loadvm snap2')))
print('status after it:', q2.execute('query-status')['status'])
q2.execute('cont')"""),
    ("md", """<details><summary>Worked solutions</summary>

1. **About the sum of its snapshots' VM sizes, plus a little more than a MiB.** The file holds the VM state of `snap1` (its `VM SIZE`, printed again above beside the file's size; `snap2`'s is on `disk0`) beyond the 128 KiB of variables, and some metadata clusters (header, tables, refcounts), and the VM state is stored in whole clusters, its last one padded: compare the allocated size with the `VM SIZE` plus 128 KiB, and look at the difference with notebook 4's tools (`Qcow2View`) if it surprises you; a qcow2 image grows with what its snapshots keep, whatever its virtual size. Compare the allocated size with the `VM SIZE`. The apparent size (`ls -l`) is larger still while the machine runs: snaplab extends an open image's file ahead of its allocations, as a sparse tail that takes no disk space, and trims it when the image is closed (docs/deviations.md 61; QEMU does not). `qemu-img check` would give the image's real end ("Image end offset").
2. **`vars.qcow2`** shows the non-zero VM size, `disk0.qcow2` shows `0 B`: `vmstate` alone decides where the state goes, among the devices listed.
3. `snap4` appears only under **"partial (non-loadable)"**: the variable store does not have it. HMP `loadvm snap4` then fails (its text is printed above): HMP `loadvm` works on all writable devices and `fw-vars` has no `snap4`. The failure is not harmless: the VM is left stopped, in `restore-vm` (printed above), as QEMU 7.2 leaves it (docs/reference/qemu-7.2-qmp.md section 14, item 2); a client must `cont`. QMP `snapshot-load` with `devices: ['disk0']` loads it, because it names the devices, and leaves the VM stopped as it found it (a load that starts with the VM stopped ends with it stopped: docs/reference/qemu-7.2-qmp.md section 6.1), so the `cont` is still needed (the last lines printed above).
4. HMP `loadvm` looks for the VM state on the first snapshot-capable image, as `savevm` puts it there: `vars.qcow2`, where `snap2` has a VM size of 0. So it refuses with QEMU's "This is a disk-only snapshot. Revert to it offline using qemu-img" (`load_snapshot` in migration/savevm.c; docs/reference/qemu-internals.md section 3.3), and the VM is again left in `restore-vm` (printed). Only QMP, naming `vmstate: 'disk0'`, can load `snap2`.
</details>"""),
    ("code", """q2s.close()"""),
]

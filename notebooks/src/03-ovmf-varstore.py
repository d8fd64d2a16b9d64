"""Notebook 03-ovmf-varstore: 3. The OVMF varstore problem"""

CELLS: list[tuple[str, str]] = [
    ("md", """# 3. The OVMF varstore problem: which devices, and where the VM state goes

**Learning goals.** After this notebook you can
1. explain why HMP `savevm` fails on a machine with a *raw* writable firmware variable store (like OVMF's `OVMF_VARS.fd`);
2. explain how QMP's `snapshot-save` avoids it by naming the devices (`devices`) and the one that receives the VM state (`vmstate`);
3. read `info snapshots` completely, including its second list, and find **where the VM state went**: which image holds it;
4. predict where HMP `savevm` puts the VM state when the variable store is qcow2 (it is not the disk).

**Prerequisites.** Notebooks 1 and 2 (block nodes, QMP jobs, HMP through `human-monitor-command`).

**What to look at.** The error text of HMP `savevm`; the two lists of `info snapshots`; the `VM SIZE` column of `qemu-img snapshot -l` for each image.

**Background.** A snapshot is taken of every device you include, and a qcow2 image keeps its snapshots inside itself; raw images cannot hold any. HMP `savevm` includes every writable block device and writes the VM state (RAM, CPU, devices) to the first one that can hold snapshots (migration/savevm.c `save_snapshot` with no device list: `bdrv_all_can_snapshot`, `bdrv_all_find_vmstate_bs`; docs/reference/qemu-internals.md section 3). The 2020 QMP series gave the reason plainly: "the semantics around choice of disks were ill-defined", and made the new commands "require the caller to be explicit about all the block device nodes used in the snapshot operations, with no built-in default heuristics in use" ([PATCH v4 9/9], 2020-09-15, see notebook 2).

Lab functions used: `lab.session.default_machine` (`varstore='raw'` or `'qcow2'`), `lab.qcow2_view.qemu_img` (runs the real `qemu-img`)."""),
    ("md", """## A raw variable store"""),
    ("code", """from lab.session import default_machine
from lab.qcow2_view import qemu_img

raw = default_machine(ram_mib=64, varstore='raw')
raw.machine.start()
q = raw.machine.qmp()
print(q.hmp('savevm snap1'))"""),
    ("md", """HMP refused: the variable store `fw-vars` is writable, so `savevm` must include it, and as a raw image it cannot hold a snapshot. QEMU 7.2 answers with the same text (docs/reference/qemu-7.2-qmp.md section 5.1). Nothing can be snapshotted with HMP on such a machine, although the disk could hold a snapshot perfectly well.

QMP names what to include. Only `disk0`, which also receives the VM state:"""),
    ("code", """q.execute('snapshot-save', {'job-id': 'j1', 'tag': 'snap1', 'vmstate': 'disk0', 'devices': ['disk0']})
q.wait_job('j1')"""),
    ("code", """# including the raw variable store fails the same way as HMP did, but as job data
q.execute('snapshot-save', {'job-id': 'j2', 'tag': 'snap2', 'vmstate': 'disk0', 'devices': ['disk0', 'fw-vars']})
q.wait_job('j2')['error']"""),
    ("code", """print(q.hmp('info snapshots'))
print(qemu_img('snapshot', '-U', '-l', str(raw.workdir / 'disk0.qcow2')))"""),
    ("md", """`info snapshots` has **two lists**. The first, "present on all disks", holds the snapshots that **every** writable device has, whether or not it can hold snapshots at all (QEMU walks all of them with `bdrv_all_has_snapshot`, as `savevm` checks all of them with `bdrv_all_can_snapshot`); the raw variable store is writable and can have none, so that list is empty, and stays empty on this machine whatever is saved. The second, "partial (non-loadable)", holds those only some devices have, here `snap1`. Its heading ends `on ''`: the list is that of one device, the first that can hold snapshots (`bdrv_all_find_vmstate_bs`), here `disk0`, and QEMU names it by its BlockBackend name (`bdrv_get_device_name`); and disks attached with `-blockdev` and `-device`, as on this lab's command line, have none, so the name is empty (QEMU 7.2 prints the same: docs/reference/qemu-7.2-qmp.md section 2). `qemu-img` reads the disk image itself and finds `snap1` there with a non-zero `VM SIZE`: the VM state went into `disk0`, as `vmstate` said. (QEMU prints the same two headings: migration/savevm.c `hmp_info_snapshots`, docs/reference/qemu-internals.md section 3.6.)

What the snapshot leaves out: the variable store is not in it. Loading `snap1` brings back RAM, CPU and disk, but the variables keep whatever the firmware wrote since; for OVMF that is the price of a raw `OVMF_VARS.fd`."""),
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
    ("md", """`snap1` is now "present on all disks", and `qemu-img` shows where the VM state went: into **`vars.qcow2`**, the variable store (non-zero `VM SIZE`), while `disk0.qcow2` got a disk-only snapshot (`0 B`). HMP took the first snapshot-capable device, and the flash comes before the disk. A 128 KiB firmware image now holds megabytes of RAM contents, past the end of its virtual size (notebook 4 shows how a qcow2 image stores VM state past the end of the disk).

QEMU 7.2 does the same: "HMP savevm put the vmstate on the first snapshot-capable node, which was the qcow2 varstore `fw-vars`" (docs/reference/qemu-7.2-qmp.md section 5.2). libvirt hit the consequence: its own choice of the VM-state device differed from QEMU's "on VMs with UEFI firmware with NVRAM image in qcow2 format", so it switched to `snapshot-load` (libvirt commit 2ed93e1a, "qemu: monitor: Add monitor infrastructure for 'snapshot-load' QMP command", Peter Krempa).

With QMP the caller decides: include the variable store in `devices`, and put the VM state on the disk:"""),
    ("code", """q2.execute('snapshot-save', {'job-id': 'j', 'tag': 'snap2', 'vmstate': 'disk0', 'devices': ['disk0', 'fw-vars']})
print(q2.wait_job('j').get('error'))
for image in ('vars.qcow2', 'disk0.qcow2'):
    print(image, qemu_img('snapshot', '-U', '-l', str(q2s.workdir / image)))"""),
    ("md", """`snap2` has its VM state on `disk0.qcow2`, and a disk-only snapshot of the variable store: both devices are covered, and the big state sits where the operator wants it.

What is QEMU's and what is snaplab's here: every text and every choice above is QEMU 7.2's; snaplab differs only in naming a read-only node "read-only" where QEMU calls it "writable" (docs/deviations.md entry 21), which does not arise in this notebook."""),
    ("md", """## Exercises: predict, then measure

1. **File size.** The variable store's virtual size is 128 KiB. After `snap1` (HMP) and `snap2` (QMP), predict: is `vars.qcow2` as a file bigger than 1 MiB?
2. **VM state on the varstore on purpose.** Save `snap3` with `vmstate: 'fw-vars'` and `devices: ['disk0', 'fw-vars']`. Predict which image shows a non-zero `VM SIZE` for `snap3`.
3. **A partial snapshot.** Save `snap4` on `devices: ['disk0']` only. Predict in which list of `info snapshots` it appears, and what HMP `loadvm snap4` answers."""),
    ("code", """import os
size = os.path.getsize(q2s.workdir / 'vars.qcow2')
print('vars.qcow2 bigger than 1 MiB:', size > 1 << 20)"""),
    ("code", """q2.execute('snapshot-save', {'job-id': 'j3', 'tag': 'snap3', 'vmstate': 'fw-vars', 'devices': ['disk0', 'fw-vars']})
print(q2.wait_job('j3').get('error'))
for image in ('vars.qcow2', 'disk0.qcow2'):
    line = [l for l in qemu_img('snapshot', '-U', '-l', str(q2s.workdir / image)).splitlines() if ' snap3 ' in l][0]
    print(image, '-> VM SIZE', ' '.join(line.split()[2:4]))"""),
    ("code", """q2.execute('snapshot-save', {'job-id': 'j4', 'tag': 'snap4', 'vmstate': 'disk0', 'devices': ['disk0']})
print(q2.wait_job('j4').get('error'))
print(q2.hmp('info snapshots'))
print(repr(q2.hmp('loadvm snap4')))
print('status after the failed loadvm:', q2.execute('query-status')['status'])"""),
    ("md", """<details><summary>Worked solutions</summary>

1. **Yes.** The file holds the VM state of `snap1` (megabytes, see its `VM SIZE` above) beyond the 128 KiB of variables; a qcow2 image grows with what its snapshots keep, whatever its virtual size.
2. **`vars.qcow2`** shows the non-zero VM size, `disk0.qcow2` shows `0 B`: `vmstate` alone decides where the state goes, among the devices listed.
3. `snap4` appears only under **"partial (non-loadable)"**: the variable store does not have it. HMP `loadvm snap4` then fails (its text is printed above): HMP `loadvm` works on all writable devices and `fw-vars` has no `snap4`. The failure is not harmless: the VM is left stopped, in `restore-vm` (printed above), as QEMU 7.2 leaves it (docs/reference/qemu-7.2-qmp.md section 14, item 2); a client must `cont` or load another snapshot. QMP `snapshot-load` with `devices: ['disk0']` could load it, because it names the devices.
</details>"""),
    ("code", """q2s.close()"""),
]

"""Notebook 01-tour: 1. A tour of the machine"""

CELLS: list[tuple[str, str]] = [
    ("md", """# 1. A tour of the machine

**Learning goals.** After this notebook you can
1. name the parts of snaplab's machine: firmware (read-only flash), variable store (writable flash), a qcow2 disk, one vCPU running a guest program;
2. drive the machine through QMP, QEMU's JSON monitor protocol: the greeting, `query-status`, `query-block`, `stop`/`cont`, and read the events they cause;
3. tell what is QEMU's here (the protocol, the command names, the reply shapes) from what is snaplab's own (the machine itself).

**Prerequisites.** Python; what a virtual machine is. No QEMU knowledge needed.

**Words used below.** *QEMU*: the open-source machine emulator whose snapshot interface snaplab copies. *OVMF*: the UEFI firmware QEMU's PCs boot, whose variable store is a separate writable file, `OVMF_VARS.fd`. *q35*: the PC model QEMU emulates with `-machine q35`. *Downtime*: the time a snapshot operation keeps the guest stopped. *Quick mode*: the small sizes the notebooks run with by default, so that a whole notebook runs in about a minute; the code says which parameter to raise for the full size.

**What to look at.** The `BootCount` line on the serial port, the `ro` (read-only) column of `query-block`, and which events `stop` and `cont` produce.

The QMP client here is `machine.qmp()`: the same protocol core as the unix socket, in process. Lab functions used: `lab.session.default_machine`, `lab.session.wait_for_serial`."""),
    ("code", r"""from lab.session import default_machine, wait_for_serial

session = default_machine(ram_mib=64, seed=1)   # quick mode; try ram_mib=1024
m = session.machine
m.start()
print(wait_for_serial(m, 'starting workload 1\n'))"""),
    ("md", """The firmware printed its version, the boot order and a boot count, then started the workload. "Workload 1" is the index of `dirty` among the four workloads (0 idle, 1 dirty, 2 disk, 3 mixed; not the seed, which is also 1 here), `default_machine`'s default: in each *iteration* it writes an 8-byte stamp into one 4 KiB page chosen at random in half of RAM, throttled here to 50 MiB/s; after each batch of 256 iterations it reports its counters (iterations, bytes dirtied) through the *lab port*, an I/O port (0x510) the lab reads, stamped with the host's clock (`m.lab`). The boot count is read from the variable store and written back, so the variable store is guest state that lives on a *writable* block device, like OVMF's `OVMF_VARS.fd`; exercise 2 below shows it changing. Notebook 3 shows why a writable firmware file matters for snapshots."""),
    ("code", """q = m.qmp()
q.greeting"""),
    ("md", """**The version.** The greeting carries QEMU 7.2.22's version triple, so that clients that read the version (qmp-shell reads it to print its banner: docs/reference/qemu-internals.md, the qemu.qmp section) see QEMU 7.2, while `package` says what it really is (docs/deviations.md, entry 18).

**The capabilities.** `capabilities` lists the optional protocol features the server offers (`oob`, out-of-band commands, in QEMU 7.2's greeting too); a client enables them with `qmp_capabilities`, which `machine.qmp()` has already sent.

**The shape.** The greeting's shape, `{"QMP": {"version": ..., "capabilities": [...]}}`, is QEMU's (QEMU's source tree: docs/interop/qmp-spec.rst, "Server Greeting")."""),
    ("code", """q.execute('query-status')"""),
    ("code", """[(b['inserted']['node-name'], b['inserted']['drv'], b['inserted']['ro'], b['qdev']) for b in q.execute('query-block')]"""),
    ("md", """Three block nodes, as on the QEMU command line this lab copies (`-blockdev` nodes `fw-code`, `fw-vars`, `disk0`; docs/reference/qemu-7.2-qmp.md section 2): the firmware code is read-only (`ro` True), while the variable store and the disk are writable. Each is a *format* node (raw or qcow2: how to read the bytes) on top of a *protocol* node (`fw-vars-file`, `disk0-file`, ...: where the bytes are, here a file), which `query-block` does not list. Only qcow2 can hold snapshots (notebook 3).

What is **not** QEMU's: the machine. It is a small flat 64-bit x86 machine emulated with Unicorn, not a q35 PC, and it runs snaplab's firmware instead of OVMF (docs/deviations.md, entry 12)."""),
    ("code", """q.events()   # forget what came before
q.execute('stop')
print(q.execute('query-status'))
q.execute('cont')
[e.event for e in q.events()]"""),
    ("md", """`stop` paused the vCPU (`status: paused`, `running: False`) and `cont` resumed it; each emitted one event, `STOP` then `RESUME`. In QEMU these events are emitted whenever the VM stops or resumes, whatever the cause (QEMU's source tree: qapi/run-state.json, STOP and RESUME). Every snapshot notebook measures *downtime* as the time from the STOP event's timestamp to the RESUME event's: each event carries the instant it happened (its `timestamp`), which is what counts, not when a client reads it.

The same facts in human form, through HMP (the human monitor) tunnelled in QMP's `human-monitor-command` (libvirt's `virsh qemu-monitor-command --hmp` sends it this way):"""),
    ("code", """print(q.hmp('info status'))
print(q.hmp('info block'))   # (the file names are this run's scratch directory)"""),
    ("md", """`info block` prints QEMU's lines, `Cache mode` included: that line copies QEMU's display (writeback, QEMU's default) and does not describe what snaplab does. snaplab writes a snapshot's RAM pages around the page cache (`O_DIRECT`: docs/deviations.md 57)."""),
    ("md", """## Exercises: predict, then measure

Write your prediction down before you run each cell.

1. **A paused guest.** While the VM is stopped for 0.3 s, by how much does the guest's iteration counter (reported through the lab port, `m.lab.last.iterations`) advance, compared with 0.3 s while it runs? Work out the running figure first: 50 MiB/s of 4 KiB pages is 12,800 iterations a second. The counter is read from the guest's reports, one every batch of 256 iterations, so a reading lags the truth by up to 256. And after `cont` (the cell waits for the guest's next report, at most 10 s)?
2. **Reset.** After `system_reset`, which boot count will the firmware print, and which event will QMP deliver?
3. **Twice stopped.** `stop`, `stop`, `cont`: how many STOP events?"""),
    ("code", """# NBVAL_IGNORE_OUTPUT
import time
r0 = m.lab.last.iterations; time.sleep(0.3); r1 = m.lab.last.iterations   # the control: 0.3 s running
want = 50 * 2**20 // 4096 * 3 // 10   # 50 MiB/s of 4 KiB pages for 0.3 s
print(f'advanced in 0.3 s while running: {r1 - r0} iterations (expected {want} within a batch of 256: {want - 256}-{want + 256})')
q.execute('stop'); a = m.lab.last.iterations; time.sleep(0.3); b = m.lab.last.iterations
q.execute('cont'); t0 = time.monotonic()
while m.lab.last.iterations == b and time.monotonic() - t0 < 10:  # the guest's next report, not a fixed sleep
    time.sleep(0.01)
c = m.lab.last.iterations
print('advanced while stopped:', b - a, '| advanced after cont:', c - b, 'iterations by its next report')"""),
    ("code", """print('ran while running:', r1 - r0 > 0, '| stood still while stopped:', b == a, '| ran again after cont:', c > b)"""),
    ("code", """q.events()
boots = m.serial.text().count('BootCount: ')   # the boots counted so far
q.execute('system_reset')
text = wait_for_serial(m, 'BootCount: ', count=boots + 1)   # whatever the next boot prints
print([line for line in text.splitlines() if line.startswith('BootCount')][-1])
[(e.event, e.data) for e in q.events()]"""),
    ("code", """q.events()
q.execute('stop'); q.execute('stop'); q.execute('cont')
[e.event for e in q.events()]"""),
    ("md", """<details><summary>Worked solutions (open after you have predicted and run the cells)</summary>

1. **0 while stopped**, against about 3,840 iterations in the same 0.3 s while running (the first line prints both: the counter is read at the guest's last report, so it lags by up to one batch): the vCPU thread is parked, so no guest instruction runs and the counter stands still (`advanced while stopped: 0`). After `cont` it advances again, by one batch (256) or more at its next report. This is what "downtime" means for the guest: time in which it makes no progress.
2. **`BootCount: 2`** and one **`RESET`** event, whose data say who asked (`guest: False`: the host, through QMP) and why (`reason`: QEMU 7.2's value for a QMP `system_reset`). The reset restarts the firmware, but the flash is a block device and is not reset: the variable store kept the count written at the first boot, and the firmware incremented it. State that survives a reset on a writable device is state a snapshot must cover (notebook 3).
3. **One STOP.** Stopping a stopped VM changes no run state, so there is nothing to announce; QEMU's `do_vm_stop` (QEMU's source tree: softmmu/cpus.c) likewise sends STOP only when the VM was running. One RESUME follows the `cont`.
</details>"""),
    ("code", """session.close()"""),
]

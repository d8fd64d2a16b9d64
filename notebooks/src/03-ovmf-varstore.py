"""Notebook 03-ovmf-varstore: 3. The OVMF varstore problem"""

CELLS: list[tuple[str, str]] = [
    ("md", """# 3. The OVMF varstore problem

What this shows: with a *raw* writable firmware variable store (like OVMF_VARS.fd), HMP `savevm` cannot work: it snapshots every writable device, and raw cannot hold snapshots. QMP `snapshot-save` names the devices (`vmstate`, `devices`) and leaves the varstore out; a qcow2 varstore is the other fix.

Lab functions used: `lab.session.default_machine` (`varstore='raw'` or `'qcow2'`)."""),
    ("code", """from lab.session import default_machine

raw = default_machine(ram_mib=64, varstore='raw')
raw.machine.start()
q = raw.machine.qmp()
print(q.hmp('savevm snap1'))"""),
    ("code", """q.execute('snapshot-save', {'job-id': 'j1', 'tag': 'snap1', 'vmstate': 'disk0', 'devices': ['disk0']})
info = q.wait_job('j1')
info"""),
    ("code", """q.execute('snapshot-save', {'job-id': 'j2', 'tag': 'snap2', 'vmstate': 'disk0', 'devices': ['disk0', 'fw-vars']})
q.wait_job('j2')['error']"""),
    ("code", """# QMP checks arguments before anything happens, with QEMU's wording
try:
    q.execute('snapshot-save', {'job-id': 'j3', 'tag': 1, 'vmstate': 'disk0', 'devices': ['disk0']})
except Exception as err:
    print(type(err).__name__, err.error_class, err)"""),
    ("code", """raw.close()

q2s = default_machine(ram_mib=64, varstore='qcow2')
q2s.machine.start()
q2 = q2s.machine.qmp()
print(repr(q2.hmp('savevm snap1')))
print(q2.hmp('info snapshots').splitlines()[0])"""),
    ("code", """q2s.close()"""),
]

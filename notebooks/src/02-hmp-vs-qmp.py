"""Notebook 02-hmp-vs-qmp: 2. HMP vs QMP"""

CELLS: list[tuple[str, str]] = [
    ("md", """# 2. HMP vs QMP

What this shows: the four problems the 2020 qemu-devel thread "migration: bring savevm/loadvm/delvm over to QMP" set out to fix, live: HMP reports errors as successful text, checks no types, cannot be introspected, and `savevm` blocks the monitor; QMP's `snapshot-save` has error classes, typed arguments, `query-qmp-schema`, and runs as a job.

Lab functions used: `lab.session.default_machine`, `lab.demo.monitor_during_save`."""),
    ("code", """from lab.session import default_machine

s = default_machine(ram_mib=64, varstore='qcow2')
s.machine.start()
q = s.machine.qmp()
# 1. error reporting: HMP answers *success* with an error text inside
reply = q.raw(b'{"execute": "human-monitor-command", "arguments": {"command-line": "loadvm nope"}}')
reply"""),
    ("code", """# QMP: a job whose failure is data, with QEMU's wording
q.execute('cont')
q.execute('snapshot-load', {'job-id': 'l', 'tag': 'nope', 'vmstate': 'disk0', 'devices': ['disk0']})
q.wait_job('l')['error']"""),
    ("code", """# 2. type checking: HMP takes anything as a tag; QMP checks before any side effect
q.execute('cont')
print(repr(q.hmp('savevm 42')))
try:
    q.execute('snapshot-save', {'job-id': 'j', 'tag': 42, 'vmstate': 'disk0', 'devices': ['disk0']})
except Exception as err:
    print(err.error_class, '-', err)"""),
    ("code", """# 3. introspection: what does snapshot-save take?
schema = {e['name']: e for e in q.execute('query-qmp-schema')}
def kind(t):
    e = schema[t]
    return t if e['meta-type'] in ('builtin', 'array') else e['meta-type'] + ' ' + str(e.get('values', ''))
[(m['name'], kind(m['type']), 'optional' if 'default' in m else 'required')
 for m in schema[schema['snapshot-save']['arg-type']]['members']]"""),
    ("code", """s.close()
# 4. blocking: the monitor answers while a save runs
from lab.demo import monitor_during_save
r = monitor_during_save(ram_mib=256)
{k: r[k] for k in ('job error', 'answered before the guest resumed')}"""),
]

"""Notebook 01-tour: 1. A tour of the machine"""

CELLS: list[tuple[str, str]] = [
    ("md", """# 1. A tour of the machine

What this shows: the guest boots from snaplab's firmware, counts its boots in a UEFI-style variable store, starts its workload, and is driven through QMP (`query-status`, `query-block`, `stop`/`cont`) exactly as QEMU would be.

Lab functions used: `lab.session.default_machine`, `lab.session.wait_for_serial`; the QMP client is `machine.qmp()` (in process, no sockets)."""),
    ("code", r"""from lab.session import default_machine, wait_for_serial

session = default_machine(ram_mib=64, seed=1)   # quick mode; try ram_mib=1024
m = session.machine
m.start()
print(wait_for_serial(m, 'starting workload 1\n'))"""),
    ("code", """q = m.qmp()
q.greeting['QMP']['version']"""),
    ("code", """q.execute('query-status')"""),
    ("code", """[(b['inserted']['node-name'], b['inserted']['drv'], b['inserted']['ro'], b['qdev']) for b in q.execute('query-block')]"""),
    ("code", """q.execute('stop')
print(q.execute('query-status'))
q.execute('cont')
[e.event for e in q.events()]"""),
    ("code", """print(q.hmp('info status'))
print(q.hmp('info block'))"""),
    ("code", """session.close()"""),
]

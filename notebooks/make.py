"""Write the notebooks from their cell lists and execute them, storing the outputs nbval
compares.  Run from the repository: ``python notebooks/make.py``."""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent

NOTEBOOKS: dict[str, list[tuple[str, str]]] = {
    "01-tour.ipynb": [
        ("md", "# 1. A tour of the machine\n\nWhat this shows: the guest boots from snaplab's firmware, "
               "counts its boots in a UEFI-style variable store, starts its workload, and is driven through "
               "QMP (`query-status`, `query-block`, `stop`/`cont`) exactly as QEMU would be.\n\n"
               "Lab functions used: `lab.session.default_machine`, `lab.session.wait_for_serial`; the QMP client "
               "is `machine.qmp()` (in process, no sockets)."),
        ("code", "from lab.session import default_machine, wait_for_serial\n\n"
                 "session = default_machine(ram_mib=64, seed=1)   # quick mode; try ram_mib=1024\n"
                 "m = session.machine\nm.start()\nprint(wait_for_serial(m, 'starting workload 1\\n'))"),
        ("code", "q = m.qmp()\nq.greeting['QMP']['version']"),
        ("code", "q.execute('query-status')"),
        ("code", "[(b['inserted']['node-name'], b['inserted']['drv'], b['inserted']['ro'], b['qdev']) "
                 "for b in q.execute('query-block')]"),
        ("code", "q.execute('stop')\nprint(q.execute('query-status'))\nq.execute('cont')\n"
                 "[e.event for e in q.events()]"),
        ("code", "print(q.hmp('info status'))\nprint(q.hmp('info block'))"),
        ("code", "session.close()"),
    ],
    "03-ovmf-varstore.ipynb": [
        ("md", "# 3. The OVMF varstore problem\n\nWhat this shows: with a *raw* writable firmware variable store "
               "(like OVMF_VARS.fd), HMP `savevm` cannot work: it snapshots every writable device, and raw "
               "cannot hold snapshots. QMP `snapshot-save` names the devices (`vmstate`, `devices`) and leaves "
               "the varstore out; a qcow2 varstore is the other fix.\n\n"
               "Lab functions used: `lab.session.default_machine` (`varstore='raw'` or `'qcow2'`)."),
        ("code", "from lab.session import default_machine\n\n"
                 "raw = default_machine(ram_mib=64, varstore='raw')\nraw.machine.start()\nq = raw.machine.qmp()\n"
                 "print(q.hmp('savevm snap1'))"),
        ("code", "q.execute('snapshot-save', {'job-id': 'j1', 'tag': 'snap1', 'vmstate': 'disk0', 'devices': ['disk0']})\n"
                 "info = q.wait_job('j1')\ninfo"),
        ("code", "q.execute('snapshot-save', {'job-id': 'j2', 'tag': 'snap2', 'vmstate': 'disk0', "
                 "'devices': ['disk0', 'fw-vars']})\nq.wait_job('j2')['error']"),
        ("code", "# QMP checks arguments before anything happens, with QEMU's wording\n"
                 "try:\n    q.execute('snapshot-save', {'job-id': 'j3', 'tag': 1, 'vmstate': 'disk0', 'devices': ['disk0']})\n"
                 "except Exception as err:\n    print(type(err).__name__, err.error_class, err)"),
        ("code", "raw.close()\n\nq2s = default_machine(ram_mib=64, varstore='qcow2')\nq2s.machine.start()\n"
                 "q2 = q2s.machine.qmp()\nprint(repr(q2.hmp('savevm snap1')))\n"
                 "print(q2.hmp('info snapshots').splitlines()[0])"),
        ("code", "q2s.close()"),
    ],
    "05-copy-on-write.ipynb": [
        ("md", "# 5. Copy-on-write snapshots\n\nWhat this shows: a blocking save stops the guest for as long "
               "as it takes to write its RAM; the copy-on-write engine stops it only to freeze the disks and "
               "write-protect RAM (userfaultfd), then saves in the background while the guest runs. The saved "
               "state is still the stop instant, bit for bit: every page's generation stamp matches the "
               "host-side model of the workload at the guest's own iteration counter.\n\n"
               "Lab functions used: `lab.run.compare`, `lab.plot.downtime_vs_ram`, `lab.results.table`, "
               "`lab.proofs.stop_instant_proof`."),
        ("code", "QUICK = True   # False: the full experiment (RAM up to 4 GiB, more repetitions)\n"
                 "SIZES = [64, 128] if QUICK else [256, 1024, 4096]\nREPS = 1 if QUICK else 5\nSEED = 1"),
        ("code", "# NBVAL_IGNORE_OUTPUT\nfrom lab.run import compare\nfrom lab import results\n"
                 "rows = compare(SIZES, seed=SEED, repetitions=REPS)\nprint(results.table(rows))"),
        ("code", "cow = [r for r in rows if r['engine'] == 'cow']\nblk = [r for r in rows if r['engine'] == 'blocking']\n"
                 "print('copy-on-write downtime shorter than blocking at every size:',\n"
                 "      all(c['downtime_ms'] < b['downtime_ms'] for c, b in zip(cow, blk)))"),
        ("code", "# NBVAL_IGNORE_OUTPUT\nfrom lab import plot\nfig = plot.downtime_vs_ram(rows)"),
        ("code", "from lab.proofs import stop_instant_proof\nstop_instant_proof('cow', seed=SEED)"),
    ],
}


def build(names: list[str]) -> None:
    for name, cells in NOTEBOOKS.items():
        if names and name not in names:
            continue
        nb = nbformat.v4.new_notebook()
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nb.cells = [nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src)
                    for kind, src in cells]
        NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}).execute()
        nbformat.write(nb, HERE / name)
        print("wrote", name)


if __name__ == "__main__":
    build(sys.argv[1:])

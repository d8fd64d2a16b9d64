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
        ("code", "# NBVAL_IGNORE_OUTPUT\n# the guest keeps running through the window, slowed while it faults\n"
                 "from lab.run import run_experiment\nfrom lab.spec import ExperimentSpec\n"
                 "one = run_experiment(ExperimentSpec(ram_mib=max(SIZES), engine='cow', repetitions=2, seed=SEED))\n"
                 "fig = plot.progress_timeline(one[-1])"),
        ("code", "# NBVAL_IGNORE_OUTPUT\nfig = plot.fault_latency(one)"),
        ("code", "from lab.proofs import stop_instant_proof\nstop_instant_proof('cow', seed=SEED)"),
    ],
}

NOTEBOOKS.update({
    "02-hmp-vs-qmp.ipynb": [
        ("md", "# 2. HMP vs QMP\n\nWhat this shows: the four problems the 2020 qemu-devel thread \"migration: bring "
               "savevm/loadvm/delvm over to QMP\" set out to fix, live: HMP reports errors as successful text, "
               "checks no types, cannot be introspected, and `savevm` blocks the monitor; QMP's `snapshot-save` "
               "has error classes, typed arguments, `query-qmp-schema`, and runs as a job.\n\n"
               "Lab functions used: `lab.session.default_machine`, `lab.demo.monitor_during_save`."),
        ("code", "from lab.session import default_machine\n\ns = default_machine(ram_mib=64, varstore='qcow2')\n"
                 "s.machine.start()\nq = s.machine.qmp()\n"
                 "# 1. error reporting: HMP answers *success* with an error text inside\n"
                 "reply = q.raw(b'{\"execute\": \"human-monitor-command\", \"arguments\": {\"command-line\": \"loadvm nope\"}}')\n"
                 "reply"),
        ("code", "# QMP: a job whose failure is data, with QEMU's wording\nq.execute('cont')\n"
                 "q.execute('snapshot-load', {'job-id': 'l', 'tag': 'nope', 'vmstate': 'disk0', 'devices': ['disk0']})\n"
                 "q.wait_job('l')['error']"),
        ("code", "# 2. type checking: HMP takes anything as a tag; QMP checks before any side effect\n"
                 "q.execute('cont')\nprint(repr(q.hmp('savevm 42')))\n"
                 "try:\n    q.execute('snapshot-save', {'job-id': 'j', 'tag': 42, 'vmstate': 'disk0', 'devices': ['disk0']})\n"
                 "except Exception as err:\n    print(err.error_class, '-', err)"),
        ("code", "# 3. introspection: what does snapshot-save take?\nschema = {e['name']: e for e in q.execute('query-qmp-schema')}\n"
                 "def kind(t):\n    e = schema[t]\n    return t if e['meta-type'] in ('builtin', 'array') else e['meta-type'] + ' ' + str(e.get('values', ''))\n"
                 "[(m['name'], kind(m['type']), 'optional' if 'default' in m else 'required')\n"
                 " for m in schema[schema['snapshot-save']['arg-type']]['members']]"),
        ("code", "s.close()\n# 4. blocking: the monitor answers while a save runs\nfrom lab.demo import monitor_during_save\n"
                 "r = monitor_during_save(ram_mib=256)\n{k: r[k] for k in ('job error', 'answered before the guest resumed')}"),
    ],
    "04-blocking-savevm.ipynb": [
        ("md", "# 4. Blocking savevm\n\nWhat this shows: a blocking save stops the guest while it scans RAM for zero "
               "pages, writes the rest into the qcow2 image and commits the snapshot; the stop grows with the "
               "RAM in use. QEMU 7.2's recorded figures (RAM full of random bytes) are drawn beside.\n\n"
               "Lab functions used: `lab.run.run_experiment`, `lab.results.table`, `lab.plot.downtime_vs_ram`, "
               "`lab.reference.qemu_reference`."),
        ("code", "QUICK = True\nSIZES = [64, 128, 256] if QUICK else [256, 1024, 2048, 4096]\nSEED = 1"),
        ("code", "# NBVAL_IGNORE_OUTPUT\nfrom lab.run import run_experiment\nfrom lab.spec import ExperimentSpec\n"
                 "from lab import results\nrows = []\nfor mib in SIZES:\n"
                 "    rows += run_experiment(ExperimentSpec(ram_mib=mib, engine='blocking', seed=SEED, repetitions=2))\n"
                 "print(results.table(rows))"),
        ("code", "# NBVAL_IGNORE_OUTPUT\n# where the time goes, per save (ms)\n"
                 "[(r['ram_mib'], round(r['zero_scan_ms'], 1), round(r['write_ms'], 1), round(r['commit_ms'], 1)) for r in rows]"),
        ("code", "print('the stopped time includes the zero scan, the writes and the commit:',\n"
                 "      all(r['downtime_internal_ms'] >= r['write_ms'] for r in rows))"),
        ("code", "# NBVAL_IGNORE_OUTPUT\nfrom lab import plot\nfrom lab.reference import qemu_reference\n"
                 "ref = qemu_reference()\nfig = plot.downtime_vs_ram(rows, reference={'QEMU 7.2 savevm (recorded)': "
                 "{k: v * 1000 for k, v in ref['blocking save downtime'].items()}})"),
    ],
    "06-engines.ipynb": [
        ("md", "# 6. Blocking vs copy-on-write vs pre-copy\n\nWhat this shows, in one figure: how long each engine stops "
               "the guest, how long until the snapshot exists, and how fast the guest runs meanwhile; and which "
               "instant each one saves (blocking and copy-on-write: the stop; pre-copy: the end).\n\n"
               "Lab functions used: `lab.run.run_experiment`, `lab.plot.engines_figure`, `lab.proofs.stop_instant_proof`."),
        ("code", "QUICK = True\nRAM_MIB = 128 if QUICK else 1024\nREPS = 2 if QUICK else 5"),
        ("code", "# NBVAL_IGNORE_OUTPUT\nfrom lab.run import run_experiment\nfrom lab.spec import ExperimentSpec\n"
                 "from lab import results\nrows = []\nfor eng in ('blocking', 'cow', 'precopy'):\n"
                 "    rows += run_experiment(ExperimentSpec(ram_mib=RAM_MIB, engine=eng, repetitions=REPS))\n"
                 "print(results.table(rows))"),
        ("code", "# NBVAL_IGNORE_OUTPUT\nfrom lab import plot\nfig = plot.engines_figure(rows)"),
        ("code", "from lab.proofs import stop_instant_proof\n[stop_instant_proof(e)['exact'] for e in ('blocking', 'cow', 'precopy')]"),
    ],
    "07-lazy-restore.ipynb": [
        ("md", "# 7. Lazy restore\n\nWhat this shows: a blocking `snapshot-load` keeps the guest stopped until all RAM "
               "is read back; the lazy engine loads CPU and devices, empties RAM and resumes at once (the disks "
               "are reverted right after, before any guest disk access gets through); pages come back on first "
               "touch (userfaultfd missing-page faults) and from a background filler.\n\nLab functions used: `lab.run.load_experiment`, `lab.plot.load_figure`."),
        ("code", "QUICK = True\nRAM_MIB = 128 if QUICK else 4096"),
        ("code", "# NBVAL_IGNORE_OUTPUT\nfrom lab.run import load_experiment\nrows = load_experiment(RAM_MIB, repetitions=2)\n"
                 "[(r['engine'], round(r['stopped_ms'], 2), round(r['complete_s'], 3), r['faults']) for r in rows]"),
        ("code", "# NBVAL_IGNORE_OUTPUT\nfrom lab import plot\nfig = plot.load_figure(rows)"),
        ("code", "lazy = [r for r in rows if r['engine'] == 'lazy']\nblocking = [r for r in rows if r['engine'] == 'blocking']\n"
                 "print('every lazy load resumed the guest sooner than every blocking load:',\n"
                 "      max(r['stopped_ms'] for r in lazy) < min(r['stopped_ms'] for r in blocking))"),
    ],
    "08-reproduction.ipynb": [
        ("md", "# 8. Reproduction: snaplab beside QEMU 7.2\n\nWhat this shows: our downtimes beside QEMU 7.2's, measured "
               "on this project's machines (data/reference/qemu-7.2.csv, from shared/reference). The quick mode "
               "uses small guests; `bench/bench_snapshot.py` and `bench/bench_cow.py` run the same setup as QEMU's "
               "(RAM full of random bytes, 1-4 GiB) and run QEMU itself when it is installed.\n\n"
               "Lab functions used: `lab.reference.qemu_reference`, `lab.run.compare`, `lab.run.load_experiment`, `lab.plot.downtime_vs_ram`, `lab.plot.throughput`."),
        ("code", "from lab.reference import qemu_reference\nref = qemu_reference()\nsorted(ref)"),
        ("code", "ref['blocking save downtime'], ref['background snapshot downtime']"),
        ("code", "# NBVAL_IGNORE_OUTPUT\nfrom lab.run import compare\nfrom lab import plot, results\n"
                 "rows = compare([64, 128], repetitions=1)\nprint(results.table(rows))\n"
                 "fig = plot.downtime_vs_ram(rows, reference={\n"
                 "    'QEMU 7.2 savevm (recorded)': {k: v * 1e3 for k, v in ref['blocking save downtime'].items()},\n"
                 "    'QEMU 7.2 background-snapshot (recorded)': {k: v * 1e3 for k, v in ref['background snapshot downtime'].items()}})"),
        ("md", "Throughput: MiB of vmstate written (or read) per second of stop, beside QEMU's recorded figures "
               "(QEMU's RAM was full of random bytes, so its vmstate is about its RAM size). The quick guests "
               "are small, so fixed costs weigh more here than at 1 GiB; `bench/bench_snapshot.py` measures both "
               "sides at 1 GiB in one run."),
        ("code", "# NBVAL_IGNORE_OUTPUT\nfrom lab.run import load_experiment\n"
                 "loads = load_experiment(128, engines=('blocking',), repetitions=1)\n"
                 "fig = plot.throughput(rows, loads, reference=ref)"),
    ],
})


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

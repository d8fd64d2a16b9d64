"""Notebook 02-hmp-vs-qmp: 2. HMP vs QMP"""

CELLS: list[tuple[str, str]] = [
    ("md", """# 2. HMP vs QMP: what moving savevm to QMP fixed, and what it did not

**Learning goals.** After this notebook you can
1. name four problems a program meets when it drives HMP's `savevm`/`loadvm`/`delvm`: errors reported as successful text, a command line of text instead of typed arguments, no introspection (all three general properties of HMP against QMP), and a monitor blocked while the command runs, the reason the 2020 qemu-devel series "migration: bring savevm/loadvm/delvm over to QMP" (Daniel P. Berrangé; the commands exist since QEMU 6.0, defined in qapi/migration.json; qapi/job.json adds only their `JobType` values) gives first, beside the ill-defined choice of disks (notebook 3);
2. show the three that moving to QMP fixed, live: QMP's `snapshot-save`/`-load`/`-delete` report errors as data, check argument types, and are described by `query-qmp-schema`;
3. show, by measuring the real QEMU 7.2, that the fourth was **not** fixed: `snapshot-save` is a job, but the job still runs in QEMU's main loop, and the monitor dispatches no further command until the save is over;
4. say what snaplab does differently there (its monitor answers during a save) and why that is snaplab's improvement, not QMP's.

**Prerequisites.** Notebook 1 (QMP commands, STOP/RESUME events).

**Words.** *HMP*: the human monitor, a command line of text (`savevm snap1`); a QMP client reaches it through `human-monitor-command`, which returns whatever HMP printed, as a string, in a successful reply. *QMP*: the machine protocol, JSON commands with typed arguments. *Main loop*: QEMU's central event loop, which runs timers, I/O callbacks and monitor commands one after another. *Bottom half*: a callback scheduled to run soon in that loop. *`restore-vm`*: the run state of a VM stopped for a snapshot load. *TCG*: QEMU's software CPU emulator (no KVM), the same family of emulator as snaplab's Unicorn. *OVMF*: the UEFI firmware QEMU guests boot. *`vmstate`/`devices`*: `snapshot-save`'s arguments naming the block node that receives the VM state and the nodes to snapshot (notebook 3).

**What to look at.** The `return` wrapper around an HMP error; the error *class* of a QMP type error; the schema table; and, in the race tables, *when* each `query-status` was answered relative to STOP and RESUME, on QEMU and on snaplab.

**Source.** The series' last patch says it in its commit message: "While this design uses the generic job framework, the current impl is still blocking. The intention that the blocking problem is fixed later." ([PATCH v4 9/9] "migration: introduce snapshot-{save, load, delete} QMP commands", 2020-09-15, patchwork.ozlabs.org/project/qemu-devel/patch/20200915113523.2520317-10-berrange@redhat.com). The same message gives the reasons HMP savevm was never converted before: "they blocked execution of the event thread, and the semantics around choice of disks were ill-defined" (the second reason is notebook 3's subject).

Lab functions used: `lab.session.default_machine`, `lab.teach.monitor_race_snaplab`, `lab.teach.monitor_race_qemu` (runs `qemu-system-x86_64`), `lab.teach.spread_table`."""),
    ("code", """from lab.session import default_machine

s = default_machine(ram_mib=64, varstore='qcow2')
s.machine.start()
q = s.machine.qmp()
# Problem 1, error reporting: HMP answers *success* with an error text inside
q.events()   # (forgotten: only the events that follow are printed)
reply = q.raw(b'{"execute": "human-monitor-command", "arguments": {"command-line": "loadvm nope"}}')
print(reply)
print('then: status', repr(q.execute('query-status')['status']), '| events', [e.event for e in q.events()])"""),
    ("md", """The reply is a QMP *success* (`return`), and the failure is only visible in its text: `human-monitor-command` succeeds whenever HMP ran the line, whatever HMP printed; a program has to parse English to notice. QEMU 7.2 answers exactly so (docs/reference/qemu-7.2-qmp.md section 13: "an HMP error is a *successful* QMP reply whose string starts with `Error: `"). And the "success" did something: the VM stopped (a STOP event, no RESUME) and stays in `restore-vm`, as QEMU 7.2 leaves it (the same reference, section 14, item 2): the failed load stopped the guest before it found that the snapshot does not exist, and nothing in the reply says the guest no longer runs. A client that only checks for `return` carries on with a stopped VM.

Not every HMP error text starts with `Error:` either. A line HMP cannot parse is refused by the monitor's own parser (monitor/hmp.c `monitor_parse_arguments`) with text of another shape, and nothing is done:"""),
    ("code", """print(repr(q.hmp('savevm my snap')))   # a tag with a space, unquoted: two arguments where savevm takes one
print('snapshots named my:', sum(line.split()[1:2] == ['my'] for line in q.hmp('info snapshots').splitlines()))"""),
    ("md", """QEMU 7.2 gives the same two lines for the same command (checked beside the real QEMU in tests/conformance/test_qemu_differential.py). A client that looks for `Error:` misses this one entirely, and a client that builds HMP lines from user input must quote every argument itself (`savevm "my snap"`)."""),
    ("code", """# QMP: the failure is data in the job's query-jobs entry, with QEMU's wording
q.execute('snapshot-load', {'job-id': 'l', 'tag': 'nope', 'vmstate': 'disk0', 'devices': ['disk0']})
q.wait_job('l')['error']"""),
    ("code", """q.execute('cont')   # both failed loads left the VM stopped, in QEMU as here (docs/reference/qemu-7.2-qmp.md section 6)
# Problem 2, type checking: HMP's command line is text, QMP's arguments are typed JSON
print(repr(q.hmp('savevm 42')))
print([line.split()[1] for line in q.hmp('info snapshots').splitlines() if line.split()[1:2] == ['42']])
try:
    q.execute('snapshot-save', {'job-id': 'j', 'tag': 42, 'vmstate': 'disk0', 'devices': ['disk0']})
except Exception as err:
    print(err.error_class, '-', err)"""),
    ("md", """HMP's `savevm 42` succeeded silently (an empty string) and created a snapshot named `42` (listed by `info snapshots` above). That is legitimate: HMP commands do declare their arguments' types (`args_type` in QEMU's hmp-commands.hx, checked by the monitor's parser), and `savevm` declares its one argument a string, so `42` *is* a valid tag. What a program cannot do over HMP is say what it *meant*: it builds a line of text, must quote and escape everything itself, and learns of a mistake, if ever, by parsing the reply. QMP's arguments are typed JSON checked against the schema: the integer `42` (say, a client that passed a counter where a name belongs) was refused with a `GenericError` before anything happened, in QEMU's words."""),
    ("code", """# Problem 3, introspection: what does snapshot-save take?
schema = {e['name']: e for e in q.execute('query-qmp-schema')}
def kind(t):
    e = schema[t]
    return t if e['meta-type'] in ('builtin', 'array') else e['meta-type'] + ' ' + str(e.get('values', ''))
[(m['name'], kind(m['type']), 'optional' if 'default' in m else 'required')
 for m in schema[schema['snapshot-save']['arg-type']]['members']]"""),
    ("md", """A client can learn from the server itself that `snapshot-save` takes four required arguments, as QEMU 7.2's schema says (docs/reference/qemu-7.2-qmp.md section 7). The two optional members with the `__org.snaplab_` prefix are snaplab's downstream extensions (QAPI's naming rule for downstream additions; docs/deviations.md entry 27): `engine` chooses the save engine of notebooks 7-9, `wp-backend` the write-protection backend a copy-on-write engine uses. QEMU 7.2 does not have them."""),
    ("code", """s.close()"""),
    ("md", """## Problem 4: does the monitor answer while a save runs?

The experiment: a guest with 128 MiB of RAM, 64 MiB of it random bytes (so the save has real work to do), one qcow2 disk. Send `snapshot-save`, then `query-status`; time each reply against the STOP and RESUME events. Three repetitions each. The two sides are driven differently, and the difference matters:

* **QEMU**: both commands go out over its unix socket in one `sendall`, so `query-status` is already waiting when the save starts; one `query-status` is enough, because QEMU dispatches no further in-band command until the save is over (its monitor may read the socket on an I/O thread, but commands run in the main loop; only out-of-band commands, `exec-oob`, could run meanwhile, and `query-status` is not one).
* **snaplab**: the client is in process (`Machine.qmp()`), and a call returns only when its reply has come, so `query-status` goes out after the `snapshot-save` reply. That reply can come before the job has stopped the guest, so a single `query-status` may well be answered *before* STOP and say `running`, which proves nothing. So the snaplab side asks again every 2 ms until the guest runs again, and counts the answers that came **between STOP and RESUME saying `save-vm`**: only those show a monitor answering during the stop.

QEMU runs with TCG and OVMF (`lab.qemu`, the set-up of docs/reference/qemu-7.2-qmp.md), writing its image through the host's page cache (its default, `cache.direct=off`), where snaplab writes around it (`O_DIRECT`). Its VM state is not snaplab's: it holds whatever else OVMF left non-zero in RAM and QEMU's own device state, in QEMU's stream format, so the two sizes differ (`vmstate_mib`) and the stop times are not a like-with-like comparison of save speed; this experiment is about the monitor."""),
    ("code", """# NBVAL_IGNORE_OUTPUT
from lab import teach
from lab.qemu import available
REPS = 3
rows = teach.monitor_race_snaplab(ram_mib=128, fill_mib=64, reps=REPS)
if available():
    rows += teach.monitor_race_qemu(ram_mib=128, reps=REPS)
for key in ('stopped_s', 'save_reply_s', 'status_reply_s'):
    print(key, '(ms)')
    print(teach.spread_table(rows, key, by=('who',), scale=1e3, digits=1))
    print()
print('vmstate_mib'); print(teach.spread_table(rows, 'vmstate_mib', by=('who',), digits=1))
print('\\neach repetition: the first query-status, when it was sent and answered against STOP, and answers while stopped')
for r in rows:
    print(f"{r['who']:9} rep {r['rep']}: stopped {r['stopped_s'] * 1e3:7.1f} ms; first query sent {r['status_sent_ms']:+8.1f} ms, "
          f"answered '{r['status_seen']}' {r['status_after_stop_ms']:+8.1f} ms after STOP; {r['answers_while_stopped']:3} answers 'save-vm' while stopped, "
          f"the first {r['first_answer_while_stopped_ms']:6.1f} ms after STOP")
print('\\nsnaplab, the stop by phase, each repetition (ms)')
for r in rows:
    if r['who'] == 'snaplab':
        print(f"rep {r['rep']}: zero scan {r['zero_scan_ms']:6.1f}, writes {r['write_ms']:7.1f}, commit {r['commit_ms']:5.1f}"
              f" | after RESUME, flush {r['flush_ms']:6.1f}")"""),
    ("code", """# the deterministic part of the same measurement
{who: {'saves without error': all(r['job error'] is None for r in rows if r['who'] == who),
       'answered save-vm while stopped, every repetition': all(r['answers_while_stopped'] > 0 for r in rows if r['who'] == who),
       'answered save-vm while stopped, in no repetition': all(r['answers_while_stopped'] == 0 for r in rows if r['who'] == who)}
 for who in sorted({r['who'] for r in rows})}"""),
    ("md", """What the tables show:

* **QEMU 7.2**: the `snapshot-save` reply arrives only after the guest has resumed (its `save_reply_s` is at least its `stopped_s`), and `query-status`, sent at the same moment, is answered after that too: never while stopped (checked above); it then says `running`, because by then the save is over. The monitor was blocked for the whole save: the job's work is a bottom half in the main loop (migration/savevm.c, `snapshot_save_job_bh`), and the monitor's commands are dispatched by the same loop. The recorded QEMU transcripts show the same at 2 GiB: a `query-status` written with the save was answered 2.63 s later, right after RESUME (docs/reference/qemu-7.2-qmp.md section 6.2).
* **snaplab**: the `snapshot-save` reply comes within a few milliseconds, and in every repetition `query-status` was answered `save-vm` between STOP and RESUME (checked above; the per-repetition lines give how many answers and how soon after STOP the first one came): the monitor answers *during* the stop, with a state a QEMU 7.2 client never sees answered. snaplab runs each job on its own thread and keeps serving the monitor (docs/deviations.md entry 15). The first answer of a repetition may say `running`: it was sent before the job stopped the guest, which is why the test counts the answers while stopped.

**Where snaplab's stop goes.** The phase lines above show it for each repetition: the writes (`writes`) are most of it, the zero scan and the commit take a few ms; the flush comes after RESUME. The writes go around the host's page cache (`O_DIRECT`, docs/deviations.md 57); notebook 5 takes the stop apart phase by phase, with its spread. QEMU's stop in the table is a different save (OVMF's VM state, QEMU's stream, flushes inside the stop), so the two `stopped_s` are not a like-with-like comparison; notebook 5 compares save speed properly.

So the responsive monitor is **snaplab's improvement over QEMU 7.2**, not something moving savevm to QMP achieved: QMP made the commands *jobs* so that a later QEMU *could* run them without blocking, as the commit message above says. The guest's stop is a separate matter: both stop the guest for the whole blocking save (`stopped_s`); notebooks 7-9 shorten that.

Consequence for a client: QEMU 7.2 cannot report a save's progress or answer a second command during it; snaplab answers, and refuses a second snapshot operation with `Another snapshot operation is in progress` (docs/deviations.md entry 25), where QEMU would simply run it afterwards."""),
    ("md", """## Exercises: predict, then measure

1. **A second save, sent during the first.** On snaplab, start a blocking save of 64 MiB of random RAM and immediately send a second `snapshot-save` with another job id. Predict: does the second job fail, wait, or run alongside? What would QEMU 7.2 do?
2. **HMP savevm of an existing name.** Run HMP `savevm dup` twice, then QMP `snapshot-save` with tag `dup`. Predict both outcomes.
3. **Bigger save, same monitor.** Double the random part to 128 MiB on both sides (RAM 192 MiB: snaplab fills from 16 MiB on, QEMU's filler covers RAM minus 64 MiB). Predict how the stop, snaplab's answers while stopped and QEMU's `status_reply_s` change."""),
    ("code", """# Exercise 1
from lab.teach import fill_random
s = default_machine(ram_mib=128, workload='idle', varstore='qcow2')
fill_random(s.machine, 64, 1)
s.machine.start(); q = s.machine.qmp()
args = {'vmstate': 'disk0', 'devices': ['disk0']}
q.execute('snapshot-save', {'job-id': 'first', 'tag': 'first', **args})
q.execute('snapshot-save', {'job-id': 'second', 'tag': 'second', **args})
print('first:', q.wait_job('first').get('error'))
print('second:', q.wait_job('second').get('error'))"""),
    ("code", """# Exercise 2
q.execute('cont') if not q.execute('query-status')['running'] else None
def dup_clock():
    return [line.split()[-1] for line in q.hmp('info snapshots').splitlines() if line.split()[1:2] == ['dup']]
print(repr(q.hmp('savevm dup'))); first = dup_clock()
print(repr(q.hmp('savevm dup'))); second = dup_clock()
print('one dup after each savevm:', len(first) == len(second) == 1, '| the second replaced the first (its VM clock moved on):', first != second)
q.execute('snapshot-save', {'job-id': 'dup', 'tag': 'dup', **args})
print(q.wait_job('dup').get('error'))
print(sum(line.split()[1:2] == ['dup'] for line in q.hmp('info snapshots').splitlines()), 'snapshot named dup')"""),
    ("code", """# NBVAL_IGNORE_OUTPUT
# Exercise 3
s.close()
big = teach.monitor_race_snaplab(ram_mib=192, fill_mib=128, reps=REPS)
if available():
    big += teach.monitor_race_qemu(ram_mib=192, reps=REPS)   # QEMU's filler: RAM minus 64 MiB = 128 MiB
for key in ('vmstate_mib', 'stopped_s', 'status_reply_s'):
    scale = 1 if key == 'vmstate_mib' else 1e3
    print(key + ('' if key == 'vmstate_mib' else ' (ms)'), ': 128 MiB random (this exercise), then 64 MiB (the run above)')
    print(teach.spread_table(big, key, by=('who',), scale=scale, digits=1))
    print(teach.spread_table(rows, key, by=('who',), scale=scale, digits=1))
for r in big:
    print(f"{r['who']:9} rep {r['rep']}: {r['answers_while_stopped']:3} answers 'save-vm' while stopped")"""),
    ("md", """<details><summary>Worked solutions</summary>

1. On snaplab the second command is accepted (it returns `{}`, as every job-starting command does), and its **job** concludes at once with the error `Another snapshot operation is in progress (...)` (printed above, read from `query-jobs`) while the first completes without error. QEMU 7.2 would not even read the second command until the first finished, then run it: two jobs never overlap there (docs/reference/qemu-7.2-qmp.md section 6.2, where `ja2` started right after `ja1` concluded). snaplab cannot wait silently because its monitor is answering, so it refuses (docs/deviations.md entry 25).
2. HMP `savevm dup` succeeds twice (two empty strings): HMP **overwrites** a snapshot of the same name (one `dup` after each, and its VM clock is the second save's: printed above). QMP refuses: `Snapshot 'dup' already exists in one or more devices`; one snapshot named `dup` remains. Both are QEMU 7.2's behaviour (docs/reference/qemu-7.2-qmp.md section 14, item 3).
3. The VM state grows by the 64 MiB of random bytes added on both sides (`vmstate_mib`: snaplab's doubles, QEMU's grows by the same 64 MiB on top of OVMF's own part), and the stop grows with the bytes to write (notebook 5 makes this precise; here the RAM grew too, 128 to 192 MiB, because QEMU's filler always leaves 64 MiB unfilled, so RAM size and bytes to write change together: notebook 5 separates them). snaplab's first answer still comes within milliseconds and its monitor keeps answering `save-vm` while stopped, more times the longer the stop lasts: the answers do not wait for the save. QEMU's `status_reply_s` grows with its stop, because the reply waits for the save to end.
</details>"""),
]

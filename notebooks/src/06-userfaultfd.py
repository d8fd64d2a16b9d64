"""Notebook 06-userfaultfd: 4b. userfaultfd step by step"""

CELLS: list[tuple[str, str]] = [
    ("md", """# 6. userfaultfd step by step: write protection, the fault loop, filling missing pages

**Learning goals.** After this notebook you can
1. name the steps of a userfaultfd write-protect window: create the descriptor and negotiate features (`UFFDIO_API`), register a range (`UFFDIO_REGISTER`), protect it (`UFFDIO_WRITEPROTECT`), serve faults in a loop, release, unregister;
2. explain what the faulting thread experiences (it blocks in the kernel until the handler releases the page) and why a snapshot's handler copies the page *before* releasing it;
3. compare the costs of 4 KiB and 2 MiB granules, measured here: arming, number of faults, time per fault, bytes copied;
4. fill missing pages three ways (`UFFDIO_COPY`, `UFFDIO_ZEROPAGE`, `UFFDIO_MOVE`) and say which lazy restore uses when;
5. say which write-protect backend snaplab uses for guest RAM, and why.

**Prerequisites.** Notebook 5 (what a blocking save does); virtual memory and page faults at the level of "a page table entry can forbid writes".

**What to look at.** The feature list the kernel grants; `faults` and `service_us` for the two granules; `ms_per_MiB` of the fill ioctls.

**Sources.** Linux `Documentation/admin-guide/mm/userfaultfd.rst` and `include/uapi/linux/userfaultfd.h` for the interface; emulator/uffd.py wraps exactly these ioctls with ctypes; emulator/migration/cow.py uses them for the copy-on-write engine. The first proposal to use it for savevm: "Async savevm must copy-on-write guest RAM ... Rik van Riel suggested using userfaultfd(2) ... UFFDIO_REGISTER_MODE_WP" (Stefan Hajnoczi, qemu-devel, 2016-10-12; shared/reference/qemu-internals.md section 4.2).

The experiments run on a scratch mapping made like snaplab's guest RAM (anonymous, private, 2 MiB aligned, advised for transparent huge pages). The thread that writes is a `ctypes.memset` caller, which releases Python's GIL while it is blocked, as the vCPU thread does inside Unicorn's `emu_start`.

Lab functions used: `lab.uffd_steps.kernel_offer`, `write_fault_loop`, `fill_costs`, `lab.teach.spread_table`, `lab.run.run_experiment`."""),
    ("code", """from lab import uffd_steps as us, teach
offer = us.kernel_offer()
offer"""),
    ("md", """Step 1, `UFFDIO_API`: this kernel grants write-protect faults (`PAGEFAULT_FLAG_WP`), write protection of pages not yet populated (`WP_UNPOPULATED`), asynchronous write protection resolved in the kernel (`WP_ASYNC`, used by the pre-copy engine's dirty tracking with `PAGEMAP_SCAN`), and `MOVE`. Step 2, `UFFDIO_REGISTER` in both modes (missing and write-protect) returns the ioctls allowed on the range, listed above.

## A write-protect window, served in Python

`write_fault_loop(granule)` registers 64 MiB, protects it with one `UFFDIO_WRITEPROTECT` (`arm_ms`), and starts a writer that stores one byte into each of 2000 random pages. Each store to a protected page blocks the writer in the kernel and queues a fault message; the loop reads it (`read_faults`), copies the granule around the page (the contents a snapshot must keep, still unchanged), then releases the granule's protection, which wakes the writer to retry its store. Three repetitions per granule."""),
    ("code", """# NBVAL_IGNORE_OUTPUT
REPS = 3
runs = [us.write_fault_loop(g, seed=rep) for g in (4096, 2 << 20) for rep in range(REPS)]
rows = [{**{k: v for k, v in r.items() if k != 'service_us'}, 'granule': '4 KiB' if r['granule'] == 4096 else '2 MiB',
         'service_us_median': teach.group_median([{'x': x} for x in r['service_us']], 'x')} for r in runs]
for key in ('arm_ms', 'faults', 'service_us_median', 'writer_ms'):
    print(key)
    print(teach.spread_table(rows, key, by=('granule',)))"""),
    ("code", """by = {g: [r for r in rows if r['granule'] == g] for g in ('4 KiB', '2 MiB')}
print('2 MiB granules: at most 32 faults (64 MiB / 2 MiB):', all(r['faults'] <= 32 for r in by['2 MiB']))
print('4 KiB granules: more faults than 2 MiB ones, every run:', min(r['faults'] for r in by['4 KiB']) > max(r['faults'] for r in by['2 MiB']))
print('4 KiB granules copy fewer bytes:', max(r['bytes_copied'] for r in by['4 KiB']) < min(r['bytes_copied'] for r in by['2 MiB']))"""),
    ("md", """**4 KiB against 2 MiB.** Arming costs the same for both (one ioctl over the range, before any granule matters). With 4 KiB granules every distinct page written takes a fault (2000 writes hit a little under 2000 distinct pages), each fault is cheap to serve (a 4 KiB copy) but costs a round trip through the kernel and the Python loop, and the writer is slowed by all of them. With 2 MiB granules a fault copies 512 times as much, so each takes longer, but there are at most 32 faults for 64 MiB, and every later write to the chunk goes through unhindered. Releasing 4 KiB inside a transparent huge page also forces the kernel to split it into 4 KiB entries. snaplab's copy-on-write engine uses 2 MiB chunks for these reasons (docs/deviations.md entry 32; emulator/migration/cow.py docstring); QEMU's background snapshot saves the faulting page itself ("finding respective RAM block and saving faulting page to the migration stream", shared/reference/qemu-internals.md section 4.1).

## Filling missing pages: what lazy restore does

A range registered in *missing* mode faults on first access to a page that has no page table entry. The handler fills it: `UFFDIO_COPY` copies from a buffer, `UFFDIO_ZEROPAGE` maps zeros, `UFFDIO_MOVE` (Linux 6.8) moves the pages of another anonymous range of the same process in, without copying. Each call also wakes the thread that waited. `fill_costs` fills 32 MiB with each, in 4 KiB and in 2 MiB calls, and checks the contents."""),
    ("code", """# NBVAL_IGNORE_OUTPUT
fills = us.fill_costs(reps=REPS)
print(teach.spread_table(fills, 'ms_per_MiB', by=('ioctl', 'step'), digits=3))"""),
    ("code", """sorted({(r['ioctl'], r['step'], r['bytes_filled'] == 32 << 20, r['contents_right']) for r in fills})"""),
    ("md", """Every fill put the right contents in all 32 MiB. Per MiB, 2 MiB calls are much cheaper than 4 KiB calls for all three: the per-call cost (a system call, a page-table walk) is paid 512 times less often, and a zero or moved huge page can be installed as one huge-page entry. `UFFDIO_MOVE` of whole huge pages is the cheapest because nothing is copied. snaplab's lazy load engines fill RAM in 2 MiB chunks: they read a chunk into the old RAM's pages set aside and move them in with `UFFDIO_MOVE` where the kernel allows it, and fall back to `UFFDIO_COPY` otherwise (emulator/migration/postcopy.py `_fill`). Notebook 11 measures the lazy loads.

## Which write-protect backend does snaplab use, and why?"""),
    ("code", """from lab.spec import WP_BACKENDS, ExperimentSpec, compare_engines
from lab.run import run_experiment
COW = compare_engines()[1]
print('backends:', WP_BACKENDS)
auto = run_experiment(ExperimentSpec(ram_mib=64, engine=COW, repetitions=REPS))
tlb = run_experiment(ExperimentSpec(ram_mib=64, engine=COW, repetitions=REPS, wp_backend='unicorn-tlb'))
print('auto chose:', sorted({r['wp_backend_used'] for r in auto}), '| forced:', sorted({r['wp_backend_used'] for r in tlb}))"""),
    ("code", """# NBVAL_IGNORE_OUTPUT
print(teach.spread_table(auto + tlb, 'downtime_ms', by=('wp_backend',), digits=3))
print(teach.spread_table(auto + tlb, 'progress_during_save', by=('wp_backend',), digits=3))"""),
    ("md", """`auto` chose **userfaultfd**, because this kernel grants it (the first cell). The alternative, `unicorn-tlb`, is a fallback for hosts without userfaultfd: it switches Unicorn to a software TLB with a Python hook for the snapshot window and catches writes there (emulator/migration/engine.py `protector`; docs/deviations.md entry 31). The feasibility probe behind that choice measured userfaultfd arming at 1.2 ms per 64 MiB and about 61-66 us per fault served from Python, while the TLB hook costs a Python call on every TLB miss for the whole window, slowing TLB-heavy guests from 60 M to 3.5 M instructions per second (shared/reference/unicorn-notes.md, TL;DR). Per-page `uc.mem_protect` was ruled out there (30 ms per call, it splits regions). The two rows above are both measured here, on the default guest throttled to 100 MiB/s: on such a guest the two are close (compare their downtime and the guest's speed during the save); the probe's slowdown concerns guests that miss Unicorn's TLB often, and the fallback also replaces the guest MMU (no guest paging), which is why it is only the fallback.

## Exercises: predict, then measure

1. **Arming cost.** Predict how `arm_ms` changes from 64 MiB to 256 MiB with 2 MiB-aligned huge pages.
2. **Writes to the same page.** With 2000 writes to only 10 distinct pages (4 KiB granules), predict the number of faults.
3. **Zero fill by copy.** Would filling a missing range with `UFFDIO_COPY` from a zero buffer cost the same as `UFFDIO_ZEROPAGE`? Use the table above."""),
    ("code", """# NBVAL_IGNORE_OUTPUT
arms = [us.write_fault_loop(2 << 20, size=mib << 20, writes=10, seed=rep) | {'mib': mib} for mib in (64, 256) for rep in range(REPS)]
print(teach.spread_table(arms, 'arm_ms', by=('mib',), digits=3))"""),
    ("code", """import ctypes
few = us.Scratch(64 << 20)
from emulator.uffd import UserFaultFD, UFFD_FEATURE_PAGEFAULT_FLAG_WP, UFFDIO_REGISTER_MODE_WP
u = UserFaultFD(UFFD_FEATURE_PAGEFAULT_FLAG_WP)
u.register(few.addr, few.size, UFFDIO_REGISTER_MODE_WP); u.writeprotect(few.addr, few.size, True)
import threading
pages = [few.addr + (i % 10) * 4096 for i in range(2000)]
t = threading.Thread(target=lambda: [ctypes.memset(a, 3, 1) for a in pages]); t.start()
faults = 0
while t.is_alive() or faults == 0:
    for f in u.read_faults():
        faults += 1
        u.writeprotect(f.address & ~4095, 4096, False)
t.join(); u.unregister(few.addr, few.size); u.close(); few.close()
print('faults:', faults)"""),
    ("md", """<details><summary>Worked solutions</summary>

1. About the **same**, a few hundredths of a millisecond for both (printed above): with transparent huge pages, 256 MiB is only 128 page-table entries to mark, so the system call itself dominates. With 4 KiB page tables it would grow with the size: the probe measured 1.2 ms per 64 MiB and 15 ms per GiB (shared/reference/unicorn-notes.md), and snaplab arms about 0.1 ms per GiB with huge pages (emulator/migration/cow.py docstring).
2. **10**: the first write to each page faults; the handler releases that page, so the other 1990 writes go straight through.
3. No: `UFFDIO_ZEROPAGE` maps the shared zero page (or a zero huge page) without copying, while `UFFDIO_COPY` copies 4 KiB or 2 MiB of zeros into freshly allocated memory; compare the two rows of the fill table at the same step.
</details>"""),
]

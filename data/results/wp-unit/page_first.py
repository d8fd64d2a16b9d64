"""Scratch: 'page first, chunk after': a fault copies and releases only its 4 KiB page, a filler
thread copies the rest of the chunk and releases it whole.  Paced writer as bench_wp_unit."""
import ctypes, select, sys, threading, time, queue
import numpy as np
from emulator.memory import GuestRAM
from emulator.uffd import UserFaultFD, UFFDIO_REGISTER_MODE_WP
CH = 2 << 20; PG = 4096
WS = 256 << 20
ram = GuestRAM(WS); ram.populate(write=True); base = ram.addr
u = UserFaultFD(); u.register(base, WS, UFFDIO_REGISTER_MODE_WP); u.writeprotect(base, WS, True)
n = WS // CH
bufs = [ctypes.create_string_buffer(CH) for _ in range(n)]
for b in bufs: ctypes.memset(b, 1, CH)
state = np.zeros(n, np.int8)  # 0 untouched, 1 in progress, 2 done
released = [set() for _ in range(n)]
locks = [threading.Lock() for _ in range(n)]
q = queue.SimpleQueue()
stop = False; lat = []; fill_t = []
def serve():
    p = select.poll(); p.register(u.fd, select.POLLIN)
    while not stop:
        if not p.poll(50): continue
        for f in u.read_faults():
            t0 = time.perf_counter()
            c = (f.address - base) // CH
            pg = (f.address - base) // PG
            with locks[c]:
                if state[c] == 2:
                    u.wake(base + pg * PG, PG)
                else:
                    ctypes.memmove(ctypes.addressof(bufs[c]) + (pg % 512) * PG, base + pg * PG, PG)
                    u.writeprotect(base + pg * PG, PG, False)
                    released[c].add(pg % 512)
                    if state[c] == 0:
                        state[c] = 1; q.put(c)
            lat.append(time.perf_counter() - t0)
def fill():
    while not stop:
        try: c = q.get(timeout=0.05)
        except queue.Empty: continue
        t0 = time.perf_counter()
        with locks[c]:
            rel = released[c]
            # copy runs of pages not released
            i = 0
            while i < 512:
                if i in rel: i += 1; continue
                j = i
                while j < 512 and j not in rel: j += 1
                ctypes.memmove(ctypes.addressof(bufs[c]) + i * PG, base + c * CH + i * PG, (j - i) * PG)
                i = j
            u.writeprotect(base + c * CH, CH, False)
            state[c] = 2
        fill_t.append(time.perf_counter() - t0)
th = threading.Thread(target=serve, daemon=True); th.start()
tf = threading.Thread(target=fill, daemon=True); tf.start()
rng = np.random.default_rng(1); one = ctypes.c_uint64(7); took = []
for b in range(25):
    pages = rng.integers(0, WS // PG, 256).tolist()
    t0 = time.perf_counter()
    for pg in pages:
        ctypes.memmove(base + pg * PG, ctypes.byref(one), 8)
    took.append(time.perf_counter() - t0)
    time.sleep(max(0, 0.010 - took[-1]))
stop = True; th.join(); tf.join()
print(f"page-first: faults {len(lat)}, handler median {np.median(lat)*1e6:.0f} us sum {sum(lat)*1e3:.1f} ms; fills {len(fill_t)} median {np.median(fill_t)*1e6:.0f} us; "
      f"batches {[round(x*1e3,1) for x in took[:6]]}; stall {sum(max(0,t-0.010) for t in took)*1e3:.1f} ms; THP {ram.huge_bytes()>>20} MiB")

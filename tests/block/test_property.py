"""Property test: random write/snapshot sequences against a plain in-memory model."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emulator.block import Qcow2Image
from emulator.block.io import MemoryFile

SIZE = 256 << 10

op = st.one_of(
    st.tuples(st.just("write"), st.integers(0, SIZE - 1), st.integers(1, 20_000), st.integers(1, 255)),
    st.tuples(st.just("zero"), st.integers(0, SIZE - 1), st.integers(1, 20_000), st.just(0)),
    st.tuples(st.just("discard"), st.integers(0, SIZE - 1), st.integers(1, 40_000), st.just(0)),
    st.tuples(st.just("create"), st.integers(0, 3), st.just(0), st.just(0)),
    st.tuples(st.just("goto"), st.integers(0, 3), st.just(0), st.just(0)),
    st.tuples(st.just("delete"), st.integers(0, 3), st.just(0), st.just(0)),
    st.tuples(st.just("reopen"), st.just(0), st.just(0), st.just(0)),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cs=st.sampled_from([512, 4096, 65536]), ops=st.lists(op, max_size=25))
def test_matches_model(cs: int, ops: list[tuple[str, int, int, int]]) -> None:
    f = MemoryFile()
    img = Qcow2Image.create(f, SIZE, cluster_size=cs)
    model = bytearray(SIZE)
    snaps: dict[str, bytes] = {}
    for kind, a, b, c in ops:
        if kind == "write":
            n = min(b, SIZE - a)
            img.write(a, bytes([c]) * n)
            model[a:a + n] = bytes([c]) * n
        elif kind == "zero":
            n = min(b, SIZE - a)
            img.write_zeroes(a, n)
            model[a:a + n] = bytes(n)
        elif kind == "discard":
            n = min(b, SIZE - a)
            first = -(-a // cs) * cs
            last = (a + n) // cs * cs
            img.discard(a, n)
            if last > first:
                model[first:last] = bytes(last - first)
        elif kind == "create":
            name = f"s{a}"
            if name in snaps:
                continue
            img.snapshot_create(name)
            snaps[name] = bytes(model)
        elif kind == "goto":
            name = f"s{a}"
            if name not in snaps:
                continue
            img.snapshot_goto(name)
            model[:] = snaps[name]
        elif kind == "delete":
            name = f"s{a}"
            if name not in snaps:
                continue
            img.snapshot_delete(name=name)
            del snaps[name]
        else:
            img.close()
            img = Qcow2Image(f)
        assert img.read(0, SIZE) == bytes(model)
    for name, data in snaps.items():
        buf = bytearray(SIZE)
        img.snapshot_read(name, 0, buf)
        assert bytes(buf) == data
    res = img.check()
    assert res.clean, res.messages[:5]

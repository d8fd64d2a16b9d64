"""The dashboard drives a live machine through QMP."""

from __future__ import annotations

from lab.widgets import Dashboard


def test_dashboard_take_load_delete() -> None:
    d = Dashboard()
    d.ram.value = 64
    d.engine.value = "blocking"
    d.boot()
    try:
        d.save().join(60)
        d.load().join(60)
        d.delete().join(60)
        log = d.log.value
        assert "booted 64 MiB" in log
        assert "snapshot-save snap1: done downtime" in log
        assert "snapshot-load snap1: done" in log and "snapshot-delete snap1: done" in log
        assert "STOP" in log and "RESUME" in log and "JOB_STATUS_CHANGE" in log
        d.draw()
    finally:
        d.close()

"""An ipywidgets dashboard: pick the guest and the engine, take / load / delete snapshots on a
live machine, watch guest progress and the QMP event log."""

from __future__ import annotations

import threading
import time
from typing import Any

import ipywidgets as w

from lab.session import Session, default_machine
from lab.spec import DEFAULT_ENGINE, load_engines, save_engines

ENGINE_ARG = "__org.snaplab_engine"


class Dashboard:
    """``Dashboard().widget`` in a notebook cell; every action goes through QMP."""

    def __init__(self) -> None:
        self.ram = w.SelectionSlider(options=[64, 128, 256, 512, 1024, 2048, 4096], value=128, description="RAM MiB")
        self.workload = w.Dropdown(options=["dirty", "mixed", "disk", "idle"], value="dirty", description="workload")
        self.rate = w.IntSlider(value=100, min=0, max=2000, step=50, description="MiB/s")
        self.engine = w.Dropdown(options=list(save_engines()), value=DEFAULT_ENGINE, description="save engine")
        self.load_engine = w.Dropdown(options=list(load_engines()), value=load_engines()[0], description="load engine")
        self.tag = w.Text(value="snap1", description="tag")
        self.boot_btn = w.Button(description="boot")
        self.save_btn = w.Button(description="take snapshot")
        self.load_btn = w.Button(description="load snapshot")
        self.del_btn = w.Button(description="delete snapshot")
        self.log = w.Textarea(value="", layout=w.Layout(width="100%", height="160px"), description="events")
        self.plot = w.Output()
        self.boot_btn.on_click(lambda _: self.boot())
        self.save_btn.on_click(lambda _: self.save())
        self.load_btn.on_click(lambda _: self.load())
        self.del_btn.on_click(lambda _: self.delete())
        self.session: Session | None = None
        self.q: Any = None
        self._jobs = 0
        self.widget = w.VBox([
            w.HBox([self.ram, self.workload, self.rate]),
            w.HBox([self.boot_btn, self.engine, self.load_engine, self.tag]),
            w.HBox([self.save_btn, self.load_btn, self.del_btn]),
            self.plot, self.log])

    def _say(self, line: str) -> None:
        self.log.value += line + "\n"

    def boot(self) -> None:
        self.close()
        self.session = default_machine(ram_mib=self.ram.value, workload=self.workload.value,
                                       dirty_rate_mib_s=self.rate.value)
        m = self.session.machine
        m.start()
        self.q = m.qmp()
        m.monitor.subscribe(lambda name, data, s, us: self._say(f"{s}.{us:06d} {name} {data or ''}"))
        self._say(f"booted {self.ram.value} MiB, {self.workload.value} at {self.rate.value} MiB/s")

    def _job(self, cmd: str, args: dict[str, Any]) -> threading.Thread:
        self._jobs += 1
        job = f"{cmd}-{self._jobs}"
        args = {"job-id": job, **args}

        def run() -> None:
            self.q.execute(cmd, args)
            info = self.q.wait_job(job, 600)
            stats = self.q.execute("__org.snaplab_query-snapshot-stats", {"id": job})
            self.q.execute("job-dismiss", {"id": job})
            cost = f"downtime {stats['downtime-s'] * 1e3:.2f} ms" if "downtime-s" in stats else ""
            self._say(f"{cmd} {args.get('tag')}: {info.get('error', 'done')} {cost}")
            self.draw()

        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t

    def save(self) -> threading.Thread:
        args: dict[str, Any] = {"tag": self.tag.value, "vmstate": "disk0", "devices": ["disk0"],
                                ENGINE_ARG: self.engine.value}
        return self._job("snapshot-save", args)

    def load(self) -> threading.Thread:
        args: dict[str, Any] = {"tag": self.tag.value, "vmstate": "disk0", "devices": ["disk0"],
                                ENGINE_ARG: self.load_engine.value}
        return self._job("snapshot-load", args)

    def delete(self) -> threading.Thread:
        return self._job("snapshot-delete", {"tag": self.tag.value, "devices": ["disk0"]})

    def draw(self, seconds: float = 10.0) -> None:
        """Guest progress over the last ``seconds`` (from the lab port)."""
        if self.session is None:
            return
        import matplotlib.pyplot as plt

        samples = self.session.machine.lab.history()
        if not samples:
            return
        now = time.monotonic_ns()
        pts = [((s.host_ns - now) / 1e9, s.iterations) for s in samples if now - s.host_ns <= seconds * 1e9]
        self.plot.clear_output(wait=True)
        with self.plot:
            fig, ax = plt.subplots(figsize=(6, 2.5))
            ax.step([p[0] for p in pts], [p[1] for p in pts], where="post", color="black")
            ax.set_xlabel("seconds ago")
            ax.set_ylabel("guest iterations")
            plt.show()

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None

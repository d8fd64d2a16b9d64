"""An ipywidgets dashboard: pick the guest (RAM, workload, dirty rate, working set, pattern) and
the engines, take / load / delete snapshots on a live machine, watch the guest's progress (redrawn
every second while "live plot" is ticked) and the QMP event log.

Every action goes through QMP (the in-process client).  The engines are read from the registry
(:func:`lab.spec.save_engines`, :func:`lab.spec.load_engines`), never spelled here.  What the front
end must show after a click's request has ended (a job runs on a thread) is written as widget
state: the log is a ``Textarea``'s value and the plot an ``Image``'s PNG bytes, which the front end
applies whenever they arrive; output printed into an ``Output`` widget from another thread would
be dropped by JupyterLab.  Bad input (a RAM size the machine cannot give, a load of a missing tag)
ends in the log as the machine's or QEMU's error text, never as a traceback.

Imports: the lab's session-free pieces and the emulator's public rooms (``emulator.machine``,
``emulator.guest``, ``emulator.block``, ``emulator.errors``).
"""

from __future__ import annotations

import io
import shutil
import threading
import time
from typing import Any

import ipywidgets as w
import numpy as np

from emulator.block import BlockGraph, Qcow2Image
from emulator.errors import QMPError, SnaplabError
from emulator.guest import WorkloadSpec
from emulator.machine import DiskSpec, Machine, MachineConfig
from lab import scratch
from lab.progress import rate
from lab.reproduce import rate_ratio
from lab.spec import DEFAULT_ENGINE, PATTERNS, WORKLOADS, engine_title, load_engines, save_engines

ENGINE_ARG = "__org.snaplab_engine"
STATS = "__org.snaplab_query-snapshot-stats"
MAX_LOG_LINES = 400
JOB_TIMEOUT_S = 600.0
LIVE_PERIOD_S = 1.0  # the plot's redraw period while "live plot" is ticked
WINDOW_S = 60.0  # the plot shows the last minute once the machine has run longer


class LiveMachine:
    """A running machine for the dashboard: one qcow2 disk (``disk0``) in a scratch directory,
    the guest described by the controls, the machine's start as the log's time zero."""

    def __init__(self, ram_mib: int, workload: WorkloadSpec) -> None:
        self.workdir = scratch.make("snaplab-dash-")
        try:
            Qcow2Image.create(self.workdir / "disk0.qcow2", 1 << 30).close()
            self.graph = BlockGraph()
            self.graph.add({"driver": "file", "filename": str(self.workdir / "disk0.qcow2"), "node-name": "disk0-file"})
            self.graph.add({"driver": "qcow2", "file": "disk0-file", "node-name": "disk0"})
            cfg = MachineConfig(ram_size=ram_mib << 20, workload=workload, disks=[DiskSpec("disk0", "disk0-dev")])
            self.machine = Machine(cfg, self.graph)
        except BaseException:
            shutil.rmtree(self.workdir, ignore_errors=True)
            raise
        self.t0_wall_us = 0
        self.t0_mono_ns = 0
        self.closed = threading.Event()
        self.conditions = conditions(ram_mib, workload)
        # Removed at close, when collected or at exit (the machine quits by its own exit hook);
        # if this process is killed outright, by the next one that makes a dashboard machine.
        self._discard = scratch.tie(self, self.workdir)

    def start(self) -> Any:
        """Power on; returns the QMP client."""
        self.t0_wall_us = time.time_ns() // 1000
        self.t0_mono_ns = time.monotonic_ns()
        self.machine.start()
        return self.machine.qmp()

    def close(self) -> None:
        self.closed.set()
        self.machine.close()
        self.graph.close()
        self._discard()


BIN_S = 0.05  # the progress figure's bins: a 20-60 ms stop or job shows as a dip of a bin or two


def forward_progress(iterations: np.ndarray) -> np.ndarray:
    """The guest's progress counter made monotonic: a load puts the counter back to the
    snapshot's, and the step across it counts as no progress, not as the whole drop (clipping
    a bin's difference at 0 instead would show the rest of that bin as a stall)."""
    step = np.diff(iterations.astype(np.float64), prepend=float(iterations[0]) if len(iterations) else 0.0)
    return float(iterations[0]) + np.cumsum(np.maximum(step, 0.0)) if len(iterations) else step


def _history_past(live: LiveMachine, t_ns: int, wait_s: float = 0.5) -> np.ndarray:
    """The lab port's rows once one is past ``t_ns`` (monotonic ns): the guest reports once per
    batch, so the job's end falls between two reports (at most ``wait_s``, then what there is)."""
    end = time.monotonic() + wait_s
    rows = live.machine.lab.history_array()
    while (not len(rows) or int(rows[-1, 1]) < t_ns) and time.monotonic() < end:
        time.sleep(0.005)
        rows = live.machine.lab.history_array()
    return rows


def _progress(samples: np.ndarray, t0_ns: int, t1_ns: int) -> float:
    """The guest's rate from ``t0`` to ``t1`` (monotonic ns) over its rate in the second before,
    from the lab port's rows (host_ns in column 1, iterations in column 2); NaN without samples
    around both (:func:`lab.progress.rate`, :func:`lab.reproduce.rate_ratio`)."""
    t, it = samples[:, 1].astype(np.float64), samples[:, 2].astype(np.float64)
    return rate_ratio(rate(t, it, t0_ns - 1e9, t0_ns), rate(t, it, t0_ns, t1_ns))


def conditions(ram_mib: int, spec: WorkloadSpec) -> str:
    """The guest a figure shows, in a few words (RAM, workload, rate, working set, pattern, seed)."""
    if spec.name == "idle" or not spec.rate:
        what = spec.name + ("" if spec.name == "idle" else " unpaced")
    else:
        what = f"{spec.name} {spec.rate >> 20} MiB/s"
    if spec.name != "idle":
        ws = f"{spec.working_set >> 20} MiB" if spec.working_set else "all RAM"
        what += f" over {ws}, {spec.pattern}"
    return f"{ram_mib} MiB RAM, {what}, seed {spec.seed}"


def progress_png(samples: np.ndarray, t0_mono_ns: int, stops: list[tuple[float, float | None]],
                 now_s: float, guest: str = "") -> bytes:
    """The guest's speed (iterations per second) against seconds since the machine started, the
    stopped windows shaded; a PNG.  ``samples`` are the lab port's rows (host_ns in column 1,
    iterations in column 2); ``guest`` (:func:`conditions`) goes into the title."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 2.6), dpi=90)
    ax = fig.add_subplot()
    if len(samples) >= 2:
        t = (samples[:, 1].astype(np.int64) - t0_mono_ns) / 1e9
        it = samples[:, 2].astype(np.float64)
        # from the first sample kept (the ring forgets old ones) or the window's start, up to the
        # last report: no false dip while the next batch is on its way
        start = np.floor(max(t[0], now_s - WINDOW_S - BIN_S) / BIN_S) * BIN_S
        edges = np.arange(start, t[-1], BIN_S)
        cum = np.interp(edges, t, forward_progress(it), left=0.0)
        if len(edges) >= 2:
            ax.stairs(np.diff(cum) / BIN_S, edges, baseline=None, color="black", lw=1)
    short = False
    for i, (a, b) in enumerate(stops):
        ax.axvspan(a, now_s if b is None else b, color="tab:red", alpha=0.3, lw=0,
                   label="guest stopped" if i == 0 else None)
        if b is not None and b - a < BIN_S / 5:  # too thin to see as a band: a tick at the axis
            ax.plot([a], [0], marker="^", color="tab:red", markersize=6, clip_on=False,
                    transform=ax.get_xaxis_transform(), label=None if short else "a stop under 10 ms")
            short = True
    ax.set_xlim(max(0.0, now_s - WINDOW_S), max(now_s, 1.0))
    ax.set_ylim(bottom=0)
    ax.set_xlabel("seconds since the machine started" + (f" (the last {WINDOW_S:.0f} s)" if now_s > WINDOW_S else ""))
    ax.set_ylabel("guest iterations / s")
    title = f"guest progress ({BIN_S:g} s bins; one iteration writes one page)"
    if guest:
        title += f"\n{guest}"
    ax.set_title(title + ("" if len(samples) >= 2 else ": no samples yet"), fontsize=10)
    if stops:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _choice(name: str, title: str) -> str:
    """A drop-down entry: the engine's name, then what its title adds (not the name twice)."""
    rest = title[len(name):].strip() if title.startswith(name) else title
    if rest.startswith("(") and rest.endswith(")"):
        rest = rest[1:-1]
    return f"{name}: {rest}" if rest else name


class Dashboard:
    """``Dashboard().widget`` in a notebook cell; every action goes through QMP."""

    def __init__(self) -> None:
        label = {"description_width": "110px"}
        narrow, wide = w.Layout(width="260px"), w.Layout(width="520px")
        at_boot = "; takes effect at the next boot"
        self.ram = w.IntText(value=128, description="RAM MiB", style=label, layout=narrow,
                             tooltip="the guest's RAM, 16 to 65536 MiB" + at_boot)
        self.workload = w.Dropdown(options=list(WORKLOADS), value="dirty", description="workload", style=label,
                                   layout=narrow, tooltip="the guest program's loop (data/guest/workloads.asm)" + at_boot)
        self.rate = w.IntSlider(value=100, min=0, max=2000, step=50, description="dirty MiB/s", style=label,
                                layout=w.Layout(width="360px"),
                                tooltip="MiB a second the guest writes, one 4 KiB page an iteration (100 MiB/s: 25,600 "
                                        "iterations/s on the plot); 0: unpaced, as fast as it can" + at_boot)
        self.working_set = w.IntText(value=64, description="working set MiB", style=label, layout=narrow,
                                     tooltip="how much of RAM the guest writes; 0: all of it" + at_boot)
        self.pattern = w.Dropdown(options=list(PATTERNS), value="random", description="pattern", style=label,
                                  layout=narrow, tooltip="the order the guest writes its working set in" + at_boot)
        self.tag = w.Text(value="snap1", description="tag", style=label, layout=narrow,
                          tooltip="the snapshot's name; snapshot-save never overwrites one (delete it first)")
        self.engine = w.Dropdown(options=[(_choice(e, engine_title(e)), e) for e in save_engines()],
                                 value=DEFAULT_ENGINE, description="save engine", style=label, layout=wide,
                                 tooltip="how take snapshot saves (snapshot-save's __org.snaplab_engine)")
        self.load_engine = w.Dropdown(options=[(_choice(e, engine_title(e, 'load')), e) for e in load_engines()],
                                      value=load_engines()[0], description="load engine", style=label, layout=wide,
                                      tooltip="how load snapshot loads; prefetch reads first the chunks a copy-on-write "
                                              "save saw the guest write right after its stop (the snapshot's loading set)")
        self.boot_btn = w.Button(description="boot", button_style="primary")
        self.save_btn = w.Button(description="take snapshot")
        self.load_btn = w.Button(description="load snapshot")
        self.del_btn = w.Button(description="delete snapshot")
        self.cont_btn = w.Button(description="continue", tooltip="QMP cont: a failed load leaves the guest stopped, as in QEMU")
        self.log = w.Textarea(value="", layout=w.Layout(width="100%", height="180px"), disabled=True,
                              description="events", tooltip="QMP events and job results, newest first",
                              style=label)
        self.plot = w.Image(format="png", layout=w.Layout(width="675px"))
        self.live_plot = w.Checkbox(value=True, description="live plot", indent=False,
                                    tooltip=f"redraw the plot every {LIVE_PERIOD_S:g} s while a machine runs")
        self.boot_btn.on_click(lambda _: self.boot())
        self.save_btn.on_click(lambda _: self.save())
        self.load_btn.on_click(lambda _: self.load())
        self.del_btn.on_click(lambda _: self.delete())
        self.cont_btn.on_click(lambda _: self.cont())
        for b in (self.boot_btn, self.save_btn, self.load_btn, self.del_btn, self.cont_btn):
            b.add_class("snaplab-" + b.description.replace(" ", "-"))
        for name in ("ram", "workload", "rate", "working_set", "pattern", "engine", "load_engine", "tag", "log", "plot",
                     "live_plot"):
            getattr(self, name).add_class("snaplab-" + name.replace("_", "-"))
        self.live: LiveMachine | None = None
        self.q: Any = None
        self.errors: list[str] = []
        self.results: list[dict[str, Any]] = []  # one per job that succeeded: what its 'done' line says
        self._lines: list[str] = []
        self._stops: list[tuple[float, float | None]] = []
        self._lock = threading.Lock()
        self._draw_lock = threading.Lock()
        self._jobs = 0
        self.redraws = 0  # plots drawn, by any thread (the tests watch it)
        self.widget = w.VBox([
            w.HBox([self.ram, self.workload, self.rate]),
            w.HBox([self.working_set, self.pattern, self.tag]),
            w.HBox([self.engine, self.load_engine]),
            w.HBox([self.boot_btn, self.save_btn, self.load_btn, self.del_btn, self.cont_btn, self.live_plot]),
            self.plot, self.log])
        self.draw()

    # -- the log ---------------------------------------------------------------------------

    def _rel(self, wall_us: int | None = None) -> str:
        if self.live is None:
            return "+0.000 s"
        us = (time.time_ns() // 1000 if wall_us is None else wall_us) - self.live.t0_wall_us
        return f"+{us / 1e6:.3f} s"

    def _say(self, line: str, wall_us: int | None = None) -> None:
        with self._lock:
            self._lines.append(f"{self._rel(wall_us)} {line}")
            del self._lines[:-MAX_LOG_LINES]
            self.log.value = "\n".join(reversed(self._lines))  # newest first: seen without scrolling

    def _error(self, what: str, text: str) -> None:
        self.errors.append(text)
        self._say(f"{what}: error: {text}")

    def _on_event(self, name: str, data: dict[str, Any] | None, secs: int, usecs: int) -> None:
        wall_us = secs * 1_000_000 + usecs
        live = self.live
        if live is not None and name in ("STOP", "RESUME"):
            t = (wall_us - live.t0_wall_us) / 1e6
            with self._lock:
                if name == "STOP":
                    self._stops.append((t, None))
                elif self._stops and self._stops[-1][1] is None:
                    self._stops[-1] = (self._stops[-1][0], t)
        self._say(f"{name} {data or ''}".rstrip(), wall_us)

    def lines(self) -> list[str]:
        """The log's lines (each starts with the time since the machine started)."""
        with self._lock:
            return list(self._lines)

    # -- actions ---------------------------------------------------------------------------

    def boot(self) -> bool:
        """A new machine from the controls (the old one goes only when the new one exists)."""
        try:
            ram, ws, rate = self.ram.value, self.working_set.value, self.rate.value
            if not 16 <= ram <= 65536:  # (in MiB, the field's unit, before the machine's check in bytes)
                raise ValueError(f"RAM {ram} MiB: expected 16 to 65536 MiB")
            if not 0 <= ws <= ram:
                raise ValueError(f"working set {ws} MiB: expected 0 (all of RAM) to the RAM size, {ram} MiB")
            if rate < 0:
                raise ValueError(f"dirty rate {rate} MiB/s: expected 0 (unpaced) or more")
            spec = WorkloadSpec(self.workload.value, seed=1, working_set=ws << 20,
                                rate=rate << 20, pattern=self.pattern.value)
            live = LiveMachine(ram, spec)
        except (SnaplabError, ValueError, OSError, MemoryError) as err:
            self._error("boot", str(err))
            return False
        self.close()
        with self._lock:
            self._lines, self._stops = [], []
        self.live = live
        live.machine.monitor.subscribe(self._on_event)
        self.q = live.start()
        self._say(f"booted {self.ram.value} MiB, {self.workload.value} at {self.rate.value} MiB/s, "
                  f"working set {self.working_set.value} MiB, {self.pattern.value}")
        self.draw()
        threading.Thread(target=self._refresh, args=(live,), name="dashboard-plot", daemon=True).start()
        return True

    def _refresh(self, live: LiveMachine) -> None:
        """Redraw the plot every LIVE_PERIOD_S while ``live`` is this dashboard's machine and "live
        plot" is ticked.  The PNG goes out as widget state, which the front end applies whenever it
        arrives (printing from this thread into an Output widget would be dropped)."""
        while not live.closed.wait(LIVE_PERIOD_S):
            if self.live is not live:
                return
            if self.live_plot.value:
                try:
                    self.draw()
                except Exception as err:  # noqa: BLE001 - shown once in the log, the refresher stops
                    self._error("plot", f"{type(err).__name__}: {err}")
                    return

    def _job(self, cmd: str, args: dict[str, Any]) -> threading.Thread:
        self._jobs += 1
        job = f"{cmd}-{self._jobs}"
        args = {"job-id": job, **args}
        q = self.q

        live = self.live

        def run() -> None:
            if q is None or live is None:
                self._error(cmd, "no machine: press boot first")
                return
            try:
                t_cmd, m_cmd = time.time_ns() // 1000, time.monotonic_ns()
                q.execute(cmd, args)
                info = q.wait_job(job, JOB_TIMEOUT_S, complete=True)  # an on-demand load: job-complete when ready
                t_done, m_done = time.time_ns() // 1000, time.monotonic_ns()
                stats = q.execute(STATS, {"id": job})
                q.execute("job-dismiss", {"id": job})
            except QMPError as err:
                self._error(f"{cmd} {args.get('tag')}", f"{err.qmp_class}: {err}")
                return
            except SnaplabError as err:  # the machine went away under the job, a timeout
                self._error(f"{cmd} {args.get('tag')}", str(err))
                return
            if "error" in info:
                self._error(f"{cmd} {args.get('tag')}", str(info["error"]))
            else:
                res = {"job": job, "command": cmd, "tag": args.get("tag"), "engine": args.get(ENGINE_ARG, ""),
                       "downtime_ms": stats.get("downtime-s", float("nan")) * 1e3,
                       "job_ms": (t_done - t_cmd) / 1e3,  # the command sent to the job seen concluded
                       "vmstate_mib": stats.get("vmstate-bytes", 0) / 2**20,
                       **self._job_times(live, t_cmd, t_done),
                       # a load puts the guest's counter back: its progress means nothing
                       "progress": (_progress(_history_past(live, m_done), m_cmd, m_done)
                                    if cmd == "snapshot-save" else float("nan"))}
                self.results.append(res)
                cost = (f" downtime {res['downtime_ms']:.2f} ms, job {res['job_ms']:.1f} ms"
                        + (f", VM state {res['vmstate_mib']:.1f} MiB" if cmd == "snapshot-save" else "")
                        if "downtime-s" in stats else "")
                self._say(f"{cmd} {args.get('tag')}: done{cost}")
            self.draw()

        t = threading.Thread(target=run, name=f"dashboard-{job}", daemon=True)
        t.start()
        return t

    def _job_times(self, live: LiveMachine, t_cmd_us: int, t_done_us: int) -> dict[str, float]:
        """From the command to the job's STOP, and from its RESUME to the job's end (ms): where
        a job's time goes outside its stop.  NaN where the job did not stop the guest."""
        a, b = (t_cmd_us - live.t0_wall_us) / 1e6, (t_done_us - live.t0_wall_us) / 1e6
        with self._lock:
            stops = [(x, y) for x, y in self._stops if a <= x <= b and y is not None]
        if not stops:
            return {"before_stop_ms": float("nan"), "after_resume_ms": float("nan")}
        return {"before_stop_ms": (stops[0][0] - a) * 1e3, "after_resume_ms": (b - stops[-1][1]) * 1e3}

    def _target(self) -> dict[str, Any]:
        return {"tag": self.tag.value, "vmstate": "disk0", "devices": ["disk0"]}

    def save(self) -> threading.Thread:
        return self._job("snapshot-save", {**self._target(), ENGINE_ARG: self.engine.value})

    def load(self) -> threading.Thread:
        return self._job("snapshot-load", {**self._target(), ENGINE_ARG: self.load_engine.value})

    def delete(self) -> threading.Thread:
        return self._job("snapshot-delete", {"tag": self.tag.value, "devices": ["disk0"]})

    def cont(self) -> None:
        """QMP ``cont``: the guest runs again (after a failed load QEMU leaves it stopped)."""
        if self.q is None:
            self._error("cont", "no machine: press boot first")
            return
        try:
            self.q.execute("cont")
        except QMPError as err:
            self._error("cont", f"{err.qmp_class}: {err}")

    def draw(self) -> None:
        """Redraw the plot: the guest's progress since the machine started, stops shaded."""
        with self._draw_lock:
            live = self.live
            if live is None:
                png = progress_png(np.zeros((0, 6), dtype=np.uint64), 0, [], 1.0)
            else:
                with self._lock:
                    stops = list(self._stops)
                now_s = (time.monotonic_ns() - live.t0_mono_ns) / 1e9
                png = progress_png(live.machine.lab.history_array(), live.t0_mono_ns, stops, now_s,
                                   live.conditions)
            self.plot.value = png
            self.redraws += 1

    def close(self) -> None:
        live, self.live, self.q = self.live, None, None
        if live is not None:
            live.machine.monitor.unsubscribe(self._on_event)  # its SHUTDOWN is not the next one's
            live.close()

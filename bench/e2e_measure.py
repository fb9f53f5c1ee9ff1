"""bench/e2e.py's measurement (parent side): runs a child, samples its whole process tree (PSS, RSS,
CPU time) and the machine's contention, and summarizes a run into stages and segments."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ENTRY = Path(__file__).resolve().with_name("e2e.py")  # the children run the entry point: e2e.py --child
OURS_STAGES = ["extract", "curate", "shard", "train"]
DT_STAGES = ["extract", "filter", "buckets", "cluster", "dedup_filter"]


def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _mem_kib(pid: int) -> tuple[int, int]:
    pss = rss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
                elif line.startswith("Rss:"):
                    rss = int(line.split()[1])
    except OSError:
        pass
    return pss, rss


def _cmd(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return " ".join(a.decode(errors="replace") for a in f.read().split(b"\0") if a)[:120]
    except OSError:
        return "?"


class TreeSampler(threading.Thread):
    """Sums PSS and RSS over a process and all its descendants every `interval` seconds."""

    def __init__(self, pid: int, interval: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.interval, self.samples = pid, interval, []
        self.cpu: dict[tuple[int, int], float] = {}  # (pid, start time) -> last seen utime + stime, seconds
        self.stop_ev = threading.Event()
        self.peak: list[tuple[float, str]] = []  # (PSS MiB, command) per process at the highest sample

    def run(self) -> None:
        tick = os.sysconf("SC_CLK_TCK")
        while not self.stop_ev.is_set():
            pids = _tree(self.pid)
            pss = rss = 0
            per = []
            for p in pids:
                a, b = _mem_kib(p)
                pss, rss = pss + a, rss + b
                per.append((a, p))
                try:
                    with open(f"/proc/{p}/stat") as f:
                        st = f.read().rsplit(")", 1)[1].split()
                    self.cpu[(p, int(st[19]))] = (int(st[11]) + int(st[12])) / tick
                except (OSError, ValueError, IndexError):
                    pass
            self.samples.append((time.time(), pss / 1024, rss / 1024, len(pids), sum(self.cpu.values())))
            if pss / 1024 > max((s[1] for s in self.samples[:-1]), default=0):
                self.peak = [(a / 1024, _cmd(p)) for a, p in sorted(per, reverse=True)]
            self.stop_ev.wait(self.interval)

    def cpu_s(self) -> float:
        """CPU time of every process seen in the tree (to its last sample; a process that lived less
        than one interval may be missed)."""
        return sum(self.cpu.values())

    def stop(self) -> None:
        self.stop_ev.set()
        self.join()


def _busy_cpu_s() -> float:
    """CPU-seconds the whole machine has been busy since boot (/proc/stat: all but idle and iowait)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")


def run_child(side: str, variant: str, corpus: Path, out: Path, workers: int, prefect_home: Path,
              train_steps: int, src: Path, cache: Path | None = None) -> dict:
    """One measured run: `e2e.py --child side` in a fresh process importing the code under test from src.
    `cache`: our file cache (REFINERY_CACHE: the general tokenizer); a new empty one unless given."""
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, PREFECT_HOME=str(prefect_home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_LOGGING_LEVEL="WARNING", PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="300",
               REFINERY_CACHE=str(cache or Path(str(out) + "-cache")))
    env.pop("PREFECT_API_URL", None)
    # src first for this process and every process it starts (extraction workers run `-m tasks.workers`
    # from the working directory; DataTrove's forkserver workers and Dask workers read PYTHONPATH)
    env["E2E_SRC"], env["PYTHONPATH"] = str(src), str(src)
    cmd = [sys.executable, str(ENTRY), "--child", side, "--variant", variant, "--corpus", str(corpus),
           "--out", str(out), "--workers", str(workers), "--train-steps", str(train_steps)]
    load = os.getloadavg()[0]
    busy0, me0 = _busy_cpu_s(), time.process_time()
    t0 = time.time()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         start_new_session=True, cwd=str(src))
    sampler = TreeSampler(p.pid)
    sampler.start()
    stdout, stderr = p.communicate()
    t1 = time.time()
    sampler.stop()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, signal.SIGKILL)  # leftovers of a failed pool, if any
    if p.returncode:
        sys.exit(f"{side}/{variant} failed ({p.returncode}):\n{stderr[-6000:]}")
    res = json.loads(stdout.strip().splitlines()[-1])
    # wall: process start to the flow's (or the last executor's) return, imports and Prefect's
    # embedded API start included; the bookkeeping after it (cached-run count, exit) is not
    res["load_after"] = os.getloadavg()[0]
    # contention: CPU the rest of the machine used while we ran, in cores: machine busy time minus the
    # CPU time of the measured process tree and of this process (the sampler)
    busy1 = _busy_cpu_s()
    ours_cpu = sampler.cpu_s()
    res["cpu_s"] = ours_cpu
    sampler_cpu = time.process_time() - me0  # this process: the memory sampler
    res["others_cores"] = max(0.0, (busy1 - busy0) - ours_cpu - sampler_cpu) / (t1 - t0)
    res.update(start=t0, wall=res.get("end", t1) - t0, exit=t1, load_before=load, samples=sampler.samples,
               peak_by_process=sampler.peak)
    return res


def summarize(res: dict, pages: int, stages: list[str]) -> dict:
    """Per stage: seconds, share of the run's wall time, pages/s, peak PSS/RSS during the stage."""
    samples = res["samples"]

    def peak(t0, t1, col):
        v = [s[col] for s in samples if t0 <= s[0] <= t1]
        return max(v) if v else 0.0

    rows = {}
    body = res["marks"]["flow body"][0]
    rows["startup"] = {"seconds": body - res["start"], "t": (res["start"], body)}
    for s in stages:
        if s in res["marks"]:
            a, b = res["marks"][s]
            rows[s] = {"seconds": b - a, "t": (a, b)}
    last = max(v["t"][1] for v in rows.values())
    rows["finish"] = {"seconds": res["end"] - last, "t": (last, res["end"])}
    def cpu_at(t):  # the tree's CPU-seconds so far at time t (last sample at or before it)
        v = [x[4] for x in samples if len(x) > 4 and x[0] <= t]
        return v[-1] if v else 0.0

    for r in rows.values():
        r["share"] = r["seconds"] / res["wall"]
        r["cpu_s"] = cpu_at(r["t"][1]) - cpu_at(r["t"][0])
        r["pages_per_s"] = pages / r["seconds"] if r["seconds"] > 0 else None
        r["peak_pss_mib"] = peak(*r["t"], 1)
        r["peak_rss_mib"] = peak(*r["t"], 2)
    phases: dict[str, float] = {}
    for ph in res.get("phases", []):
        phases[ph["name"]] = phases.get(ph["name"], 0.0) + ph["end"] - ph["start"]
    return {"wall": res["wall"], "pages": pages, "pages_per_s": pages / res["wall"], "stages": rows,
            "phases": phases, "segments": segments(rows, phases), "peak_pss_mib": max((s[1] for s in samples), default=0),
            "peak_rss_mib": max((s[2] for s in samples), default=0), "load_after": res.get("load_after"),
            "max_procs": max((s[3] for s in samples), default=0), "counts": res["counts"],
            "load_before": res["load_before"], "others_cores": res["others_cores"], "cpu_s": res["cpu_s"],
            "peak_by_process": res.get("peak_by_process", []),
            "mem_series": [(s[0] - res["start"], s[1]) for s in samples[::max(1, len(samples) // 400)]]}


# finer segments of a run's wall time, the same names on both sides where the work matches
SEGMENT_COLORS = {"startup": "#9e9e9e", "extract": "tab:blue", "langid + rules + signatures": "tab:orange",
                  "MinHash dedup": "tab:green", "train classifiers": "tab:purple", "score + select": "tab:brown",
                  "curate reduces + reports": "tab:pink", "tokenizer training": "tab:olive",
                  "tokenize + manifest": "tab:cyan", "train": "tab:red", "finish": "#d0d0d0"}


def segments(rows: dict, phases: dict) -> list[tuple[str, float]]:
    sec = lambda k: rows[k]["seconds"] if k in rows else 0.0  # noqa: E731
    if "filter" in rows:  # DataTrove
        return [("startup", sec("startup")), ("extract", sec("extract")),
                ("langid + rules + signatures", sec("filter")),
                ("MinHash dedup", sec("buckets") + sec("cluster") + sec("dedup_filter")), ("finish", sec("finish"))]
    ph = lambda *n: sum(phases.get(x, 0.0) for x in n)  # noqa: E731
    curate_maps = ph("curate-filter", "dedup-reduce", "train-quality", "train-toxicity", "curate-score",
                     "curate-select")
    out = [("startup", sec("startup")), ("extract", sec("extract")),
           ("langid + rules + signatures", ph("curate-filter")), ("MinHash dedup", ph("dedup-reduce")),
           ("train classifiers", ph("train-quality", "train-toxicity")),
           ("score + select", ph("curate-score", "curate-select")),
           ("curate reduces + reports", sec("curate") - curate_maps),
           ("tokenizer training", ph("shard-tokenizer")), ("tokenize + manifest", sec("shard") - ph("shard-tokenizer"))]
    if "train" in rows:
        out.append(("train", sec("train")))
    return out + [("finish", sec("finish"))]

"""Shared plumbing of the bench scripts: thread pinning, machine facts, tables, JSON results, percentiles.

Every script prints one table with `print_table` and writes `bench/results/<name>.json` with `write_result`:
``{"name", "meta": {...machine, threads, git commit, load...}, "rows": [...], "summary": {...}}``. `run_all`
reads those files back, so a script run alone and one run from `run_all` leave the same record.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_THREADS = 2  # this project's CPU machines have 2 cores


def pin_threads(threads: int) -> int:
    """Pin torch's intra-op threads (and one inter-op thread) in this process; returns the count in force.
    Child processes get the same count through `thread_env`."""
    import torch

    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # already set, or parallel work already ran in this process
        torch.set_num_interop_threads(1)
    return torch.get_num_threads()


def thread_env(threads: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a child process whose torch should use `threads` threads."""
    env = dict(os.environ if base is None else base)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    return env


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def busy_processes() -> list[str]:
    """Other heavy work that would make a measurement meaningless (the model trainer)."""
    try:
        out = subprocess.run(["pgrep", "-af", "model.train"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [ln for ln in out.splitlines() if ln.strip() and "pgrep" not in ln]


def other_busy(threshold: float = 20.0) -> list[str]:
    """Processes outside this benchmark's own process tree using more than `threshold`% CPU (ps's average over
    their lifetime: an indicator, not a measurement), niceness first."""
    try:
        out = subprocess.run(["ps", "-eo", "pid=,ppid=,ni=,pcpu=,args="], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    procs = {}
    for line in out.splitlines():
        parts = line.split(None, 4)
        if len(parts) == 5:
            procs[int(parts[0])] = (int(parts[1]), parts[2], float(parts[3]), parts[4])
    mine = {os.getpid()}
    changed = True
    while changed:  # this process and its descendants (servers) ...
        changed = False
        for p, (pp, *_rest) in procs.items():
            if pp in mine and p not in mine:
                mine.add(p)
                changed = True
    ours, pid = set(mine), procs.get(os.getpid(), (0,))[0]
    while pid in procs and pid not in ours:  # ... and its ancestors (run_all), but not their other children
        ours.add(pid)
        pid = procs[pid][0]
    return [f"ni={ni} cpu={cpu:.0f}% {args[:80]}" for p, (_, ni, cpu, args) in procs.items()
            if p not in ours and cpu > threshold and "<defunct>" not in args]


def quiet_state() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    busy = busy_processes()
    others = other_busy()
    return {"loadavg_1m": round(load[0], 2), "loadavg_5m": round(load[1], 2), "trainer_running": bool(busy),
            "other_busy": others, "quiet": not busy and not others}


def meta(threads: int | None = None, **extra: Any) -> dict[str, Any]:
    import torch

    m = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "git": git_commit(), "cpu": cpu_model(),
        "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
        "threads": threads if threads is not None else torch.get_num_threads(), **quiet_state(),
    }
    m.update(extra)
    return m


def warn_if_busy() -> None:
    q = quiet_state()
    if not q["quiet"]:
        print(f"warning: machine not quiet (trainer running: {q['trainer_running']}, busy: {q['other_busy']}); "
              "figures are for smoke checks only", file=sys.stderr)


def write_result(name: str, rows: list[dict], meta_: dict, summary: dict | None = None,
                 out_dir: Path | None = None) -> Path:
    out_dir = Path(out_dir or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    data = {"name": name, "meta": meta_, "rows": rows, "summary": summary or {}}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
    tmp.replace(path)
    return path


def read_result(name: str, out_dir: Path | None = None) -> dict | None:
    path = Path(out_dir or RESULTS) / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _jsonable(x: Any) -> Any:
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "item"):
        return x.item()
    return str(x)


# -- statistics ---------------------------------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]; None for no values."""
    xs = sorted(values)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median(values: Iterable[float]) -> float | None:
    xs = list(values)
    return statistics.median(xs) if xs else None


def timeit(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1, sync: Callable[[], None] | None = None
           ) -> list[float]:
    """Wall seconds of `repeats` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if sync:
            sync()
        t = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t)
    return times


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


# -- tables -------------------------------------------------------------------------------------------------------
Column = tuple[str, str, str]  # (row key, header, format spec such as ".1f" or "")


def fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if spec.endswith("x") and isinstance(value, int | float):
        return format(value, spec[:-1]) + "x"
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)


def format_table(title: str, columns: Sequence[Column], rows: Sequence[dict]) -> str:
    cells = [[fmt(r.get(k), spec) for k, _, spec in columns] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (_, h, _) in enumerate(columns)]
    lines = [title, "  ".join(h.rjust(w) for (_, h, _), w in zip(columns, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def print_table(title: str, columns: Sequence[Column], rows: Sequence[dict]) -> None:
    print("\n" + format_table(title, columns, rows), flush=True)

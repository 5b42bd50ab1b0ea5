"""Start, probe and stop the servers under test, one at a time, and read their peak memory.

- glm-serve: `python -m service --model DIR` from this repository's .venv with `--torch-threads max(1, N - 1)`
  (its own default on N cores: the engine process computes, the HTTP process keeps a core) and OMP_NUM_THREADS=N.
- vLLM: `python -m vllm.entrypoints.openai.api_server` from .venv-vllm (bench/setup_peers.sh), its OpenMP threads
  bound with VLLM_CPU_OMP_THREADS_BIND (cores 0..N-1). vLLM compiles the model with inductor at start-up, so
  its first start takes a minute or two.

Peak RSS is the kernel's high-water mark (VmHWM) of the server process and, summed, of its whole process tree
(vLLM runs its engine core and a worker as child processes), read just before the server is stopped.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from common import ROOT, thread_env

VENV_VLLM = ROOT / ".venv-vllm"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    name: str
    proc: subprocess.Popen
    url: str
    model: str  # the served model id
    log: Path
    started_s: float = 0.0
    pids: set[int] = field(default_factory=set)

    def tree(self) -> list[int]:
        """The server pid and its descendants (from /proc)."""
        children: dict[int, list[int]] = {}
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                stat = (d / "stat").read_text()
                ppid = int(stat[stat.rfind(")") + 2:].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
        out, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            todo += children.get(pid, [])
        self.pids.update(out)
        return out

    def peak_rss_mib(self) -> dict[str, float | None]:
        """VmHWM of the main process and the sum over its live process tree, in MiB."""
        main, total = None, 0.0
        for pid in self.tree():
            hwm = _vm_hwm_kib(pid)
            if hwm is None:
                continue
            total += hwm / 1024
            if pid == self.proc.pid:
                main = hwm / 1024
        return {"peak_rss_mib": main, "peak_rss_tree_mib": total or None}


def _vm_hwm_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def wait_ready(server: Server, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    t0 = time.monotonic()
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.proc.returncode} during start-up; "
                               f"see {server.log}:\n" + tail(server.log))
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(server.url + "/v1/models", timeout=2).status_code == 200:
                server.started_s = time.monotonic() - t0
                return
        time.sleep(0.5)
    raise TimeoutError(f"{server.name} not ready after {timeout:.0f}s; see {server.log}:\n" + tail(server.log))


def tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def start_glm_serve(model: Path, threads: int, log: Path, *, port: int | None = None, name: str = "glm-serve",
                    extra_args: list[str] | None = None, python: str | None = None, cpus: list[int] | None = None
                    ) -> Server:
    """`cpus`: pin the server's processes to these cores (its torch then uses one thread per core)."""
    port = port or free_port()
    torch_threads = len(cpus) if cpus else max(1, threads - 1)
    cmd = [python or sys.executable, "-m", "service", "--model", str(model), "--port", str(port),
           "--served-model-name", "bench", "--log-level", "warning", "--torch-threads", str(torch_threads),
           *(extra_args or [])]
    return _spawn(name, cmd, thread_env(len(cpus) if cpus else threads), port, log, cpus)


def start_vllm(model: Path, threads: int, log: Path, *, port: int | None = None, max_model_len: int = 4096,
               max_num_seqs: int = 64, kv_cache_gib: float = 2, dtype: str = "float32", cpus: list[int] | None = None
               ) -> Server:
    python = VENV_VLLM / "bin" / "python"
    if not python.exists():
        raise FileNotFoundError(f"{python} missing: run bash bench/setup_peers.sh vllm")
    port = port or free_port()
    env = thread_env(len(cpus) if cpus else threads)
    bind = ",".join(map(str, cpus)) if cpus else f"0-{threads - 1}"
    env.update({"VLLM_CPU_OMP_THREADS_BIND": bind, "VLLM_CPU_KVCACHE_SPACE": f"{kv_cache_gib:g}",
                "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"})
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--port", str(port),
           "--served-model-name", "bench", "--dtype", dtype, "--max-model-len", str(max_model_len),
           "--max-num-seqs", str(max_num_seqs), "--disable-log-stats", "--uvicorn-log-level", "warning"]
    return _spawn("vllm", cmd, env, port, log, cpus)


def _spawn(name: str, cmd: list[str], env: dict[str, str], port: int, log: Path, cpus: list[int] | None = None
           ) -> Server:
    log.parent.mkdir(parents=True, exist_ok=True)
    fh = log.open("w")
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None  # children (engine, workers) inherit it
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=pin)
    fh.close()
    return Server(name, proc, f"http://127.0.0.1:{port}", "bench", log)


def stop(server: Server, timeout: float = 30) -> int | None:
    """SIGTERM the server's process group (it started a new session), then SIGKILL what is left."""
    server.tree()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.proc.pid, signal.SIGTERM)
    try:
        server.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait(10)
    for pid in server.pids - {server.proc.pid}:  # stragglers still in the server's group (never a reused pid)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getpgid(pid) == server.proc.pid:
                os.kill(pid, signal.SIGKILL)
    return server.proc.returncode


@contextlib.contextmanager
def running(server: Server, ready_timeout: float = 600) -> Iterator[Server]:
    try:
        wait_ready(server, ready_timeout)
        yield server
    finally:
        stop(server)

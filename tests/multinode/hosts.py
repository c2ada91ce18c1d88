"""Two test hosts on one machine: network namespaces joined by a veth pair (198.18.0.0/24, the
benchmarking range, never routed off this machine), each in its own PID namespace; the worker host
also in its own mount namespace, with the data dir under an empty tmpfs so it cannot read it.

A host is stopped by killing its PID namespace's first process: the kernel then SIGKILLs every
process in it (its raylet, workers, Serve replicas), as when a machine dies. `ray stop` is never
called: from here it would kill the Ray processes inside the namespaces too.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[2]
NET = "198.18.0"
CLONE_NEWNET = 0x40000000


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), check=check, capture_output=True, text=True)


def can_make_hosts() -> Optional[str]:
    """None where namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "needs root (ip netns, unshare, mount)"
    for tool in ("ip", "unshare", "mount"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    probe = f"shoalprobe{os.getpid()}"
    r = sh("ip", "netns", "add", probe, check=False)
    sh("ip", "netns", "del", probe, check=False)
    if r.returncode != 0:
        return f"cannot make a network namespace here: {r.stderr.strip()[:200]}"
    return None


class Host:
    def __init__(self, net: "TwoHosts", name: str, ip: str, hide: list[Path]) -> None:
        self.net, self.name, self.ip, self.hide = net, name, ip, hide
        self.ns = f"{net.prefix}-{name}"
        self.temp_dir = Path(tempfile.mkdtemp(prefix=f"r{name}-", dir="/tmp"))  # AF_UNIX paths < 108 bytes
        self.proc: Optional[subprocess.Popen] = None
        self.log_path = net.tmp / f"host-{name}.log"

    def wrap(self, cmd: list[str], *, own_pid_ns: bool = False) -> list[str]:
        """``cmd`` as run on this host: its network, its view of the filesystem (hidden dirs)."""
        mounts = "".join(f"mkdir -p {p} && mount -t tmpfs -o size=1m shoal-hidden {p} && " for p in self.hide)
        inner = ["unshare", "--mount", "--propagation", "private"]
        if own_pid_ns:
            inner += ["--pid", "--fork", "--mount-proc"]
        script = f'{mounts}exec "$@"'
        return ["ip", "netns", "exec", self.ns, *inner, "sh", "-c", script, "sh", *cmd]

    def popen(self, cmd: list[str], **kw: Any) -> subprocess.Popen:
        return subprocess.Popen(self.wrap(cmd), env=self.net.env, cwd=ROOT, **kw)

    def run(self, cmd: list[str], timeout: float = 300, check: bool = False) -> subprocess.CompletedProcess:
        r = subprocess.run(self.wrap(cmd), env=self.net.env, cwd=ROOT, capture_output=True, text=True,
                           timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} on {self.name} exited {r.returncode}:\n{r.stdout[-3000:]}\n"
                                 f"{r.stderr[-3000:]}")
        return r

    def shoal(self, *args: str, timeout: float = 300, check: bool = False) -> subprocess.CompletedProcess:
        return self.run([sys.executable, "-m", "shoal.cluster.cli", *args], timeout=timeout, check=check)

    def start(self, head: bool, num_cpus: int, num_gpus: int, resources: str = "") -> None:
        ray = str(Path(sys.executable).parent / "ray")
        cmd = [ray, "start", "--block", f"--node-ip-address={self.ip}", f"--temp-dir={self.temp_dir}",
               f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}", "--disable-usage-stats"]
        if resources:
            cmd.append(f"--resources={resources}")
        if head:
            cmd += ["--head", f"--port={self.net.port}", "--include-dashboard=false"]
        else:
            cmd += [f"--address={self.net.address}"]
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen(self.wrap(cmd, own_pid_ns=True), env=self.net.env, cwd=ROOT, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def pid_ns_init(self) -> Optional[int]:
        """The first process of this host's PID namespace (`unshare --fork`'s child)."""
        if self.proc is None:
            return None
        r = sh("pgrep", "-P", str(self.proc.pid), check=False)  # ip netns exec execs unshare: proc is unshare
        kids = [int(p) for p in r.stdout.split()]
        return kids[0] if kids else None

    def kill(self) -> None:
        """Every process of this host SIGKILLed at once (a machine lost)."""
        init = self.pid_ns_init()
        if init is not None:
            try:
                os.kill(init, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc is not None:
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.proc = None


class TwoHosts:
    """Host "a" (the head and data node, 198.18.0.1) and host "b" (a worker, 198.18.0.2)."""

    def __init__(self, tmp: Path, hidden_on_b: list[Path], prefix: str = "shoalmn") -> None:
        self.tmp, self.prefix = tmp, prefix
        self.port = 6379
        self.address = f"{NET}.1:{self.port}"
        token = tmp / "ray_token"
        token.write_text(os.urandom(16).hex())
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), RAY_ADDRESS=self.address,
                        HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
                        RAY_USAGE_STATS_ENABLED="0")
        self.a = Host(self, "a", f"{NET}.1", [])
        self.b = Host(self, "b", f"{NET}.2", hidden_on_b)
        self._netns()

    def _netns(self) -> None:
        self.down_net()
        for h in (self.a, self.b):
            sh("ip", "netns", "add", h.ns)
        sh("ip", "link", "add", f"{self.prefix}-a0", "type", "veth", "peer", "name", f"{self.prefix}-b0")
        for h in (self.a, self.b):
            dev = f"{self.prefix}-{h.name}0"
            sh("ip", "link", "set", dev, "netns", h.ns)
            sh("ip", "-n", h.ns, "addr", "add", f"{h.ip}/24", "dev", dev)
            sh("ip", "-n", h.ns, "link", "set", dev, "up")
            sh("ip", "-n", h.ns, "link", "set", "lo", "up")

    def down_net(self) -> None:
        for name in ("a", "b"):
            sh("ip", "netns", "del", f"{self.prefix}-{name}", check=False)

    def start(self, cpus: tuple[int, int] = (2, 2), gpus: tuple[int, int] = (0, 0), wait_s: float = 90) -> None:
        self.a.start(True, cpus[0], gpus[0])
        self.wait_nodes(1, wait_s)
        self.b.start(False, cpus[1], gpus[1])
        self.wait_nodes(2, wait_s)

    def nodes_alive(self) -> int:
        r = self.a.run([sys.executable, "-c", "import ray; ray.init(logging_level='ERROR'); "
                        "print(sum(n['Alive'] for n in ray.nodes()))"], timeout=60)
        try:
            return int(r.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return 0

    def wait_nodes(self, n: int, wait_s: float) -> None:
        deadline = time.time() + wait_s
        while time.time() < deadline:
            if self.nodes_alive() == n:
                return
            time.sleep(1)
        raise AssertionError(f"{n} Ray node(s) not up in {wait_s:.0f} s:\n" + self.logs())

    def logs(self) -> str:
        return "\n".join(f"--- {h.log_path.name}\n{h.log_path.read_text()[-2000:]}"
                         for h in (self.a, self.b) if h.log_path.exists())

    def stop(self) -> None:
        for h in (self.b, self.a):
            h.kill()
            shutil.rmtree(h.temp_dir, ignore_errors=True)
        self.down_net()


def in_netns(ns: str, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in a thread that has joined network namespace ``ns`` (setns(2) is per thread)."""
    out: dict[str, Any] = {}

    def body() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns {ns}")
        finally:
            os.close(fd)
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            out["error"] = e

    t = threading.Thread(target=body, daemon=True)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out.get("value")

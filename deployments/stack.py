"""`kiln stack up|down|status`: the local orchestration stack on 127.0.0.1.

    kiln stack up        Prefect server (SQLite) + MLflow server (SQLite + local artifacts),
                         work pools `cpu` and `gpu` (process pools, gpu concurrency-limited),
                         a worker per pool, and every deployment in deployments/prefect.yaml
    kiln stack status    is each process alive and healthy, and where are the UIs
    kiln stack down      stop what `up` started (only those processes, by their recorded PIDs)

State lives under ``--home`` (default ./.stack): ``logs/<service>.log``, ``pids/<service>.pid``,
``stack.json`` (ports, URLs) and ``env`` (``source .stack/env`` points the prefect CLI and
MLflow clients at this stack). Each service runs in its own session, so ``down`` stops the
service and its children (uvicorn, flow-run subprocesses) and nothing else.

This module shells out to the ``prefect`` and ``mlflow`` CLIs of the running interpreter's
environment; it imports neither (llm/ stays free of Prefect).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm.storage import write_atomic

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PREFECT_FILE = REPO / "deployments" / "prefect.yaml"
# Start order; `down` stops in reverse.
SERVICES = ["prefect", "mlflow", "worker-cpu", "worker-gpu"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("--home", default=os.environ.get("KILN_STACK_HOME", ".stack"),
                   help="state directory for logs, PID files, databases (default ./.stack)")
    p.add_argument("--host", default="127.0.0.1", help="address the servers bind to (default 127.0.0.1)")
    p.add_argument("--prefect-port", type=int, default=4200, help="0 picks a free port")
    p.add_argument("--mlflow-port", type=int, default=5000, help="0 picks a free port")
    p.add_argument("--gpu-limit", type=int, default=1, help="concurrent flow runs on the gpu pool (default 1)")
    p.add_argument("--poll-seconds", type=float, default=5.0, help="how often workers ask for new runs")
    p.add_argument("--deploy", default="all",
                   help="deployments to create: 'all', 'none', or comma-separated deployment names (e.g. 'tiny')")
    p.add_argument("--data-mirror", default=os.environ.get("KILN_DATA_MIRROR", ""),
                   help="offline data mirror for the workers (KILN_DATA_MIRROR); empty: read from the hub")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for each health check")
    p.add_argument("--json", action="store_true", help="status as JSON")


# --------------------------------------------------------------------------- state


@dataclass
class Stack:
    home: Path
    host: str = "127.0.0.1"
    ports: dict[str, int] = field(default_factory=dict)
    pools: dict[str, str] = field(default_factory=lambda: {"cpu": "cpu", "gpu": "gpu"})

    @property
    def prefect_url(self) -> str:
        return f"http://{self.host}:{self.ports['prefect']}"

    @property
    def api_url(self) -> str:
        return f"{self.prefect_url}/api"

    @property
    def mlflow_url(self) -> str:
        return f"http://{self.host}:{self.ports['mlflow']}"

    def pid_file(self, name: str) -> Path:
        return self.home / "pids" / f"{name}.pid"

    def log_file(self, name: str) -> Path:
        return self.home / "logs" / f"{name}.log"

    def client_env(self) -> dict[str, str]:
        """What a client of this stack needs (written to <home>/env)."""
        return {
            "PREFECT_API_URL": self.api_url,
            "PREFECT_UI_URL": self.prefect_url,
            "MLFLOW_TRACKING_URI": self.mlflow_url,
        }

    def save(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        data = {"host": self.host, "ports": self.ports, "pools": self.pools, "prefect_ui": self.prefect_url,
                "mlflow_ui": self.mlflow_url, "env": self.client_env()}
        write_atomic(self.home / "stack.json", json.dumps(data, indent=2))
        write_atomic(self.home / "env", "".join(f"export {k}={v}\n" for k, v in self.client_env().items()))

    @classmethod
    def load(cls, home: Path) -> "Stack | None":
        try:
            data = json.loads((home / "stack.json").read_text())
        except FileNotFoundError:
            return None
        return cls(home=home, host=data["host"], ports=data["ports"], pools=data.get("pools", {}))


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def is_loopback(host: str) -> bool:
    """True when every address ``host`` resolves to is a loopback one (127.0.0.0/8, ::1).

    A name that does not resolve counts as not loopback: better a needless warning than none.
    """
    try:
        infos = socket.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError):
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def exposure_warning(host: str) -> str | None:
    """One line for stderr when the servers would be reachable from other machines: neither Prefect's
    nor MLflow's server has authentication, so anyone who can reach the port can run flows and read
    or delete runs."""
    if is_loopback(host):
        return None
    return (f"kiln stack: warning: --host {host} exposes the Prefect and MLflow servers, which have no "
            f"authentication, to every machine that can reach it; put them behind an authenticating "
            f"reverse proxy or an SSH tunnel (README: Exposing the stack)")


def port_in_use(host: str, port: int) -> bool:
    """True when something already listens on ``host:port`` (checked before a server is spawned, so
    "address already in use" is one clear line here instead of a health check timing out later)."""
    with socket.socket() as s:
        # Like the servers themselves (uvicorn sets it): connections of a just-stopped server in
        # TIME_WAIT do not count, a live listener still does.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


# --------------------------------------------------------------------------- processes


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return None


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _ours(stack: Stack, name: str, pid: int) -> bool:
    """Is ``pid`` still the process we started (not a recycled PID)? Checks its recorded marker."""
    try:
        marker = stack.pid_file(name).read_text().split(maxsplit=1)[1].strip()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, IndexError):
        return _alive(pid)
    return marker in cmdline


def spawn(stack: Stack, name: str, cmd: list[str], env: dict[str, str], marker: str) -> int:
    """Start ``cmd`` in its own session, logging to <home>/logs/<name>.log; record its PID."""
    log = open(stack.log_file(name), "ab")  # noqa: SIM115 - handed to the child
    log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(cmd)}\n".encode())
    log.flush()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO,
                            env={**os.environ, **env}, start_new_session=True)
    write_atomic(stack.pid_file(name), f"{proc.pid} {marker}\n")
    return proc.pid


def stop(stack: Stack, name: str, grace: float = 15.0) -> str:
    pid = _read_pid(stack.pid_file(name))
    if pid is None:
        return "not running"
    if not _alive(pid) or not _ours(stack, name, pid):
        stack.pid_file(name).unlink(missing_ok=True)
        return "was not running"
    # The service leads its own process group (start_new_session): stop the group.
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            break
        deadline = time.time() + wait
        while time.time() < deadline and _alive(pid):
            time.sleep(0.2)
        if not _alive(pid):
            break
    stack.pid_file(name).unlink(missing_ok=True)
    return "stopped"


# --------------------------------------------------------------------------- health


def http_ok(url: str, timeout: float = 3.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - loopback URLs we built
            return 200 <= r.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def health_url(stack: Stack, name: str) -> str:
    if name == "prefect":
        return f"{stack.api_url}/health"
    if name == "mlflow":
        return f"{stack.mlflow_url}/health"
    return f"http://{stack.host}:{stack.ports[name]}/health"  # worker webserver (--with-healthcheck)


def wait_healthy(stack: Stack, name: str, timeout: float) -> None:
    url = health_url(stack, name)
    pid = _read_pid(stack.pid_file(name))
    deadline = time.time() + timeout
    while time.time() < deadline:
        if http_ok(url):
            return
        if not _alive(pid):
            raise RuntimeError(f"{name} exited during startup; see {stack.log_file(name)}:\n{_tail(stack.log_file(name))}")
        time.sleep(0.5)
    raise RuntimeError(f"{name} not healthy at {url} after {timeout:.0f}s; see {stack.log_file(name)}:\n"
                       f"{_tail(stack.log_file(name))}")


def wait_pool(stack: Stack, pool: str, timeout: float) -> None:
    """Wait until the work pool exists (a worker creates it shortly after its health server is up)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if http_ok(f"{stack.api_url}/work_pools/{pool}"):
            return
        time.sleep(0.5)
    raise RuntimeError(f"work pool {pool!r} was not created within {timeout:.0f}s; see {stack.home / 'logs'}")


def _tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def prefect_cli(stack: Stack, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, **stack.client_env()}
    res = subprocess.run([str(BIN / "prefect"), "--no-prompt", *args], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise RuntimeError(f"prefect {' '.join(args)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


# --------------------------------------------------------------------------- up / down / status


def up(args: argparse.Namespace) -> int:
    warning = exposure_warning(args.host)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    home = Path(args.home).resolve()
    for d in ("logs", "pids", "prefect", "mlflow/artifacts"):
        (home / d).mkdir(parents=True, exist_ok=True)
    old = Stack.load(home)
    if old is not None and any(_alive(_read_pid(old.pid_file(n))) for n in SERVICES):
        print(f"kiln stack: already running under {home} (kiln stack status / down)", file=sys.stderr)
        return 1
    for flag, port in (("--prefect-port", args.prefect_port), ("--mlflow-port", args.mlflow_port)):
        if port and port_in_use(args.host, port):
            print(f"kiln stack: {args.host}:{port} is already in use (another Prefect or MLflow server?); "
                  f"stop it, or pass {flag} N (0 picks a free port)", file=sys.stderr)
            return 1
    pick = lambda p: p or free_port(args.host)  # noqa: E731
    # Pool names match deployments/prefect.yaml and orchestration.{cpu,gpu}_pool.
    stack = Stack(home=home, host=args.host, pools={"cpu": "cpu", "gpu": "gpu"},
                  ports={"prefect": pick(args.prefect_port), "mlflow": pick(args.mlflow_port),
                         "worker-cpu": free_port(args.host), "worker-gpu": free_port(args.host)})
    stack.save()
    quiet = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    prefect_home = str(home / "prefect")
    server_env = {**quiet, "PREFECT_HOME": prefect_home,
                  "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect' / 'prefect.db'}",
                  "PREFECT_UI_API_URL": stack.api_url,
                  # SQLite serialises writes; under load (workers registering, a burst of task runs) give
                  # a writer longer than the default before the API answers 503.
                  "PREFECT_SERVER_DATABASE_TIMEOUT": "60"}
    try:
        t0 = time.time()
        spawn(stack, "prefect", [str(BIN / "prefect"), "server", "start", "--host", args.host,
                                 "--port", str(stack.ports["prefect"])], server_env, "server start")
        # MLflow's background job runner (huey) is not used by Kiln: off, fewer processes.
        spawn(stack, "mlflow", [str(BIN / "mlflow"), "server",
                                "--backend-store-uri", f"sqlite:///{home / 'mlflow' / 'mlflow.db'}",
                                "--artifacts-destination", str(home / "mlflow" / "artifacts"),
                                "--host", args.host, "--port", str(stack.ports["mlflow"]), "--workers", "1"],
              {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, "mlflow server")
        # Only Prefect gates the next steps; MLflow (slower: migrations) finishes starting meanwhile.
        wait_healthy(stack, "prefect", args.timeout)
        print(f"[stack] prefect healthy ({time.time() - t0:.0f}s)", flush=True)
        worker_env = {**quiet, "PREFECT_HOME": prefect_home, **stack.client_env(),
                      "PREFECT_WORKER_QUERY_SECONDS": str(args.poll_seconds),
                      "PREFECT_WORKER_WEBSERVER_HOST": args.host,
                      "KILN_REPO": str(REPO)}
        if args.data_mirror:
            worker_env["KILN_DATA_MIRROR"] = str(Path(args.data_mirror).resolve())
        # A process worker creates its pool (type process, default job template) when missing.
        # One at a time: two workers creating their pools at once contend for SQLite's write lock.
        for kind in ("cpu", "gpu"):
            name = f"worker-{kind}"
            spawn(stack, name, [str(BIN / "prefect"), "worker", "start", "--pool", stack.pools[kind], "--type", "process",
                                "--name", f"kiln-{kind}-{socket.gethostname()}", "--with-healthcheck"],
                  worker_env | {"PREFECT_WORKER_WEBSERVER_PORT": str(stack.ports[name])}, f"--pool {stack.pools[kind]}")
            wait_healthy(stack, name, args.timeout)
            wait_pool(stack, stack.pools[kind], args.timeout)
        print(f"[stack] workers healthy, pools {stack.pools['cpu']} and {stack.pools['gpu']} exist "
              f"({time.time() - t0:.0f}s)", flush=True)
        prefect_cli(stack, "work-pool", "set-concurrency-limit", stack.pools["gpu"], str(args.gpu_limit))
        if args.deploy != "none":
            deploy(stack, args.deploy)
            print(f"[stack] deployments created ({time.time() - t0:.0f}s)", flush=True)
        wait_healthy(stack, "mlflow", args.timeout)
        print(f"[stack] mlflow healthy ({time.time() - t0:.0f}s)", flush=True)
    except Exception as e:  # noqa: BLE001 - leave nothing half-started behind
        print(f"kiln stack: up failed: {e}", file=sys.stderr)
        for name in reversed(SERVICES):
            stop(stack, name)
        return 1
    print_where(stack)
    return 0


def deploy(stack: Stack, which: str) -> None:
    """`prefect deploy` every deployment in deployments/prefect.yaml (or those named), from the repo root."""
    args = ["deploy", "--prefect-file", str(PREFECT_FILE)]
    if which == "all":
        args.append("--all")
    else:
        for name in which.split(","):
            args += ["--name", name.strip()]
    prefect_cli(stack, *args)


def print_where(stack: Stack) -> None:
    print(f"""
Kiln stack is up (state in {stack.home}):
  Prefect UI   {stack.prefect_url}
  MLflow UI    {stack.mlflow_url}
  logs         {stack.home / 'logs'}
  use it       source {stack.home / 'env'}
               prefect deployment run full-pipeline/tiny --watch
  stop it      kiln stack down --home {stack.home}""")


def status(args: argparse.Namespace) -> int:
    stack = Stack.load(Path(args.home).resolve())
    if stack is None:
        print(f"kiln stack: nothing under {Path(args.home).resolve()} (kiln stack up)")
        return 1
    rows: dict[str, Any] = {}
    for name in SERVICES:
        pid = _read_pid(stack.pid_file(name))
        alive = _alive(pid) and _ours(stack, name, pid)
        rows[name] = {"pid": pid if alive else None, "alive": alive,
                      "healthy": alive and http_ok(health_url(stack, name)), "log": str(stack.log_file(name))}
    healthy = all(r["healthy"] for r in rows.values())
    if args.json:
        print(json.dumps({"healthy": healthy, "services": rows, "prefect_ui": stack.prefect_url,
                          "mlflow_ui": stack.mlflow_url}, indent=2))
    else:
        for name, r in rows.items():
            state = "healthy" if r["healthy"] else ("running, not healthy" if r["alive"] else "down")
            print(f"{name:<11} {state:<22} pid={r['pid'] or '-':<8} {r['log']}")
        print(f"Prefect UI {stack.prefect_url}\nMLflow UI  {stack.mlflow_url}")
    return 0 if healthy else 1


def down(args: argparse.Namespace) -> int:
    stack = Stack.load(Path(args.home).resolve())
    if stack is None:
        print("kiln stack: nothing to stop")
        return 0
    for name in reversed(SERVICES):
        print(f"{name:<11} {stop(stack, name)}")
    return 0


def main(args: argparse.Namespace) -> int:
    return {"up": up, "down": down, "status": status}[args.action](args)

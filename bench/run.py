"""pgbench select-only throughput: direct to PostgreSQL, through pgwarden, through PgBouncer.

On a 2-core machine pgbench, PostgreSQL and the proxy share the cores, so absolute tps says
as much about the box as about the proxy. Hence the targets run interleaved (A B C A B C ...)
for several rounds, and what we quote are medians of per-round ratios measured side by side,
plus the proxy's CPU time per transaction, which varies far less with other load. Runs during
which something else used more than a fifth of a core are marked, not hidden.

    .venv/bin/python bench/run.py [--quick] [--markdown] [--targets direct,pgwarden,pgbouncer]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import pwd
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from proxy import native
from proxy.config import deep_merge
from proxy.tools.pgcluster import OWNER, LocalCluster, free_port

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")
OTHER_LOAD_LIMIT = 0.20  # cores; above this a run is marked as disturbed
LIST_DISTURBED = 6  # name disturbed runs below the table up to this many, else count them
TARGETS = ("direct", "pgwarden", "pgbouncer")
MODES = ("prepared", "simple", "extended")
START_TIMEOUT = 20.0  # seconds for a proxy to accept connections
STOP_TIMEOUT = 10.0
TPS_RE = re.compile(r"^tps = ([\d.]+) \(without initial connection time\)", re.M)
TX_RE = re.compile(r"^number of transactions actually processed: (\d+)", re.M)


@dataclass(frozen=True)
class Target:
    """Where pgbench connects, and the proxy process (if any) charged with the CPU it uses."""

    name: str
    port: int
    pid: int | None = None


@dataclass(frozen=True)
class Run:
    """One pgbench run; `other_load` is busy CPU not used by the processes under test, in cores."""

    round: int
    mode: str
    clients: int
    target: str
    seconds: float
    tps: float | None = None
    transactions: int | None = None
    proxy_us_per_tx: float | None = None
    other_load: float = 0.0
    error: str | None = None
    # per-transaction latency from pgbench's log (-l), runs at 1 client only
    p50_us: float | None = None
    p99_us: float | None = None

    @property
    def disturbed(self) -> bool:
        return self.other_load > OTHER_LOAD_LIMIT


# --- CPU accounting from /proc --------------------------------------------------------------


def _stat(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name (which may hold spaces): [0] is
    the state, [1] the ppid, [11:15] utime, stime, cutime, cstime in clock ticks."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def _proc_ticks(pid: int) -> int:
    """CPU of one process (all its threads) and of its reaped children."""
    return sum(int(value) for value in _stat(pid)[11:15])


def _tree_ticks(root: int) -> int:
    """CPU of PostgreSQL: the postmaster, its live backends, and (through the postmaster's
    cutime/cstime) the backends that exited and were reaped meanwhile."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        with contextlib.suppress(OSError, ValueError):
            fields = _stat(pid)
            if pid == root or int(fields[1]) == root:
                total += sum(int(value) for value in fields[11:15])
    return total


def _busy_ticks() -> int:
    """Busy CPU of the whole machine: /proc/stat's first line less idle and iowait."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(
        int, Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    )
    return user + nice + system + irq + softirq + steal


def _children_ticks() -> float:
    """CPU of our waited-for children (pgbench, while a run is measured)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (usage.ru_utime + usage.ru_stime) * CLK_TCK


# --- processes under test -------------------------------------------------------------------


def _load_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise SystemExit(f"{path}: expected a YAML mapping")
    return data


def _tail(path: Path, lines: int = 20) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def _wait_port(port: int, alive: Callable[[], bool], what: str, log: Path) -> None:
    """Wait until something accepts on 127.0.0.1:`port`; fail early if the process died."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"{what} exited before accepting connections:\n{_tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not accept on port {port} in {START_TIMEOUT:.0f}s")


def _read_pidfile(path: Path, log: Path) -> int:
    """The pid PgBouncer writes (under runuser it is not our child's) once it has started."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int(path.read_text().split()[0])
        time.sleep(0.05)
    raise RuntimeError(f"no pid in {path} after {START_TIMEOUT:.0f}s:\n{_tail(log)}")


def _stop_child(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM lets a proxy drain (there are no clients left); kill it if it hangs."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _stop_pgbouncer(proc: subprocess.Popen[bytes], pidfile: Path) -> None:
    """SIGTERM PgBouncer itself: runuser, when signalled, leaves its child unreaped."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        os.kill(int(pidfile.read_text().split()[0]), signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(STOP_TIMEOUT)
    _stop_child(proc)


def start_pgwarden(
    stack: contextlib.ExitStack,
    name: str,
    config: dict[str, Any],
    pg_port: int,
    workdir: Path,
    checkout: Path = ROOT,
) -> Target:
    """Run `python -m proxy run` on free ports; the config's addresses are always ours.
    `checkout` is the tree whose pgwarden runs, with its own .venv (this one by default)."""
    port = free_port()
    config = deep_merge(
        config,
        {
            "listen": f"127.0.0.1:{port}",
            "upstream": {"address": f"127.0.0.1:{pg_port}", "sslmode": "disable"},
            "admin": {"listen": f"127.0.0.1:{free_port()}"},
        },
    )
    config_path = workdir / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    log = workdir / f"{name}.log"
    with log.open("wb") as out:
        # A session of its own, so Ctrl-C reaches only us and we stop it in order.
        proc = subprocess.Popen(
            [_python(checkout), "-m", "proxy", "run", "--config", str(config_path)],
            cwd=checkout,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    stack.callback(_stop_child, proc)
    _wait_port(port, lambda: proc.poll() is None, name, log)
    return Target(name, port, proc.pid)


def find_pgbouncer() -> str:
    """The pgbouncer binary, installed from Debian's packages when missing (machines here
    are not kept, so the benchmark brings what it needs)."""
    found = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/sbin")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SystemExit("pgbouncer not found: install it, or leave it out with --targets")
    print("installing pgbouncer (apt-get) ...", file=sys.stderr)
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "pgbouncer"]
    if subprocess.run(install, env=env, capture_output=True, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=False)
        subprocess.run(install, env=env, capture_output=True, check=True)
    return shutil.which("pgbouncer", path="/usr/sbin:/usr/bin") or "pgbouncer"


def start_pgbouncer(
    stack: contextlib.ExitStack, binary: str, cluster: LocalCluster, workdir: Path
) -> Target:
    """PgBouncer in session mode (1.18 cannot do `-M prepared` in transaction mode), run as
    the cluster owner with its files in a directory that user owns, in the foreground so
    that it is reaped when stopped."""
    home = workdir / "pgbouncer"
    home.mkdir()
    port = free_port()
    (home / "users.txt").write_text(f'"{cluster.superuser}" ""\n')
    (home / "pgbouncer.ini").write_text(
        f"""[databases]
postgres = host={cluster.host} port={cluster.port} dbname=postgres

[pgbouncer]
pool_mode = session
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {home / "users.txt"}
max_client_conn = 200
default_pool_size = 40
logfile = {home / "pgbouncer.log"}
pidfile = {home / "pgbouncer.pid"}
"""
    )
    command = [binary, str(home / "pgbouncer.ini")]
    if os.geteuid() == 0:
        owner = pwd.getpwnam(OWNER)
        for path in (home, *home.iterdir()):
            os.chown(path, owner.pw_uid, owner.pw_gid)
        command = ["runuser", "-u", OWNER, "--", *command]
    log = workdir / "pgbouncer.stderr"  # also catches errors from before its logfile opens
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command, cwd=home, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    stack.callback(_stop_pgbouncer, proc, home / "pgbouncer.pid")
    _wait_port(port, lambda: proc.poll() is None, "pgbouncer", log)
    return Target("pgbouncer", port, _read_pidfile(home / "pgbouncer.pid", log))


# --- measuring ------------------------------------------------------------------------------


class Bench:
    """Runs pgbench against the targets and accounts for every CPU tick it can name."""

    def __init__(self, pgbench: str, postmaster: int, user: str, workdir: Path) -> None:
        self.pgbench = pgbench
        self.workdir = workdir  # where pgbench writes its per-transaction logs
        self.postmaster = postmaster
        self.user = user
        # Only our flags decide where and how pgbench connects.
        env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
        self.env = env | {"PGSSLMODE": "disable"}

    def command(self, port: int, mode: str, clients: int, seconds: float) -> list[str]:
        where = ["-h", "127.0.0.1", "-p", str(port), "-U", self.user]
        # -j must not exceed -c: `-c 1 -j 2` silently runs one thread anyway.
        load = ["-c", str(clients), "-j", str(min(clients, 2)), "-T", str(round(seconds))]
        return [self.pgbench, *where, "-S", "-n", "-M", mode, *load, "postgres"]

    def run(self, target: Target, mode: str, clients: int, seconds: float, rnd: int) -> Run:
        """One measured pgbench run: tps, proxy CPU per transaction, and the other load."""
        key = {"round": rnd, "mode": mode, "clients": clients, "target": target.name}
        cmd = self.command(target.port, mode, clients, seconds)
        logs = None
        if clients == 1:  # latency as one user feels it: every transaction's, from its log
            logs = Path(tempfile.mkdtemp(prefix="latency-", dir=self.workdir))
            cmd[1:1] = ["-l", "--log-prefix", str(logs / "tx")]
        try:
            proxy0 = _proc_ticks(target.pid) if target.pid else 0
        except OSError:
            return Run(**key, seconds=0.0, error=f"{target.name} process is gone")
        busy0, pg0, kids0 = _busy_ticks(), _tree_ticks(self.postmaster), _children_ticks()
        start = time.monotonic()
        result = subprocess.run(
            cmd, env=self.env, capture_output=True, text=True, timeout=seconds + 60, check=False
        )
        elapsed = time.monotonic() - start
        pg = _tree_ticks(self.postmaster) - pg0
        kids = _children_ticks() - kids0
        busy = _busy_ticks() - busy0
        try:
            proxy = _proc_ticks(target.pid) - proxy0 if target.pid else 0
        except OSError:
            return Run(**key, seconds=elapsed, error=f"{target.name} exited during the run")
        other = (busy - pg - kids - proxy) / CLK_TCK / elapsed
        tps, tx = TPS_RE.search(result.stdout), TX_RE.search(result.stdout)
        if result.returncode != 0 or not tps or not tx or not int(tx.group(1)):
            lines = (result.stderr or result.stdout).strip().splitlines()
            error = f"pgbench exit {result.returncode}: " + " | ".join(lines[-3:])
            return Run(**key, seconds=elapsed, other_load=other, error=error)
        transactions = int(tx.group(1))
        us_per_tx = proxy / CLK_TCK * 1e6 / transactions if target.pid else None
        p50 = p99 = None
        if logs is not None:
            p50, p99 = latency_percentiles(logs)
            shutil.rmtree(logs, ignore_errors=True)
        return Run(
            **key,
            seconds=elapsed,
            tps=float(tps.group(1)),
            transactions=transactions,
            proxy_us_per_tx=us_per_tx,
            other_load=other,
            p50_us=p50,
            p99_us=p99,
        )


def latency_percentiles(logs: Path) -> tuple[float | None, float | None]:
    """p50 and p99 of the transaction latencies (µs, the third field of each line) that
    pgbench -l wrote into `logs`."""
    latencies = []
    for path in logs.iterdir():
        with path.open() as lines:
            for line in lines:
                fields = line.split()
                if len(fields) >= 3 and fields[2].isdigit():
                    latencies.append(int(fields[2]))
    if not latencies:
        return None, None
    latencies.sort()
    return _percentile(latencies, 0.50), _percentile(latencies, 0.99)


def _percentile(ordered: list[int], q: float) -> float:
    return float(ordered[min(len(ordered) - 1, int(q * len(ordered)))])


def measure(bench: Bench, targets: list[Target], args: argparse.Namespace) -> list[Run]:
    """Warm every target up once, then rounds of A B C side by side per (mode, clients).
    Ctrl-C ends the measuring early; what was measured is still reported."""
    runs: list[Run] = []
    try:
        for target in targets:
            if args.warmup > 0:
                cmd = bench.command(target.port, "simple", 2, args.warmup)
                subprocess.run(cmd, env=bench.env, capture_output=True, check=False)
        for rnd in range(1, args.rounds + 1):
            for mode in args.modes:
                for clients in args.clients:
                    for target in targets:
                        run = bench.run(target, mode, clients, args.duration, rnd)
                        runs.append(run)
                        _progress(run, args.rounds)
    except KeyboardInterrupt:
        print(f"\ninterrupted: reporting the {len(runs)} runs done", file=sys.stderr)
    return runs


def _progress(run: Run, rounds: int) -> None:
    what = f"[round {run.round}/{rounds}] {run.mode:<8} c={run.clients:<3} {run.target:<12}"
    if run.error:
        print(f"{what} FAILED: {run.error}", file=sys.stderr)
        return
    cpu = f", {run.proxy_us_per_tx:.1f} µs/tx" if run.proxy_us_per_tx is not None else ""
    mark = " (disturbed)" if run.disturbed else ""
    print(
        f"{what} {run.tps:9.0f} tps{cpu}, other load {run.other_load:.2f} cores{mark}",
        file=sys.stderr,
    )


# --- reporting ------------------------------------------------------------------------------


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(runs: list[Run], targets: list[str], args: argparse.Namespace) -> list[dict]:
    """Per (mode, clients, target): median tps and proxy µs/tx, and the medians of the
    per-round ratios to direct and to PgBouncer; each with whether a disturbed run fed it."""
    by_key = {(r.round, r.mode, r.clients, r.target): r for r in runs if r.tps}
    rows = []
    for mode in args.modes:
        for clients in args.clients:
            for target in targets:
                own = [r for r in runs if (r.mode, r.clients, r.target) == (mode, clients, target)]
                ok = [r for r in own if r.tps]
                row: dict[str, Any] = {
                    "mode": mode,
                    "clients": clients,
                    "target": target,
                    "runs_ok": len(ok),
                    "runs_failed": len(own) - len(ok),
                    "tps": _median([r.tps for r in ok if r.tps]),
                    "cpu_us_per_tx": _median(
                        [r.proxy_us_per_tx for r in ok if r.proxy_us_per_tx is not None]
                    ),
                    "disturbed": any(r.disturbed for r in ok),
                }
                row.update(_latency(runs, by_key, mode, clients, target, args.rounds))
                for ref in ("direct", "pgbouncer"):
                    ratios, disturbed = [], False
                    if ref in targets and ref != target and target != "direct":
                        for rnd in range(1, args.rounds + 1):
                            a = by_key.get((rnd, mode, clients, target))
                            b = by_key.get((rnd, mode, clients, ref))
                            if a and b and a.tps and b.tps:
                                ratios.append(a.tps / b.tps)
                                disturbed |= a.disturbed or b.disturbed
                    row[f"vs_{ref}"] = _median(ratios)
                    row[f"vs_{ref}_disturbed"] = disturbed
                rows.append(row)
    return rows


def _latency(
    runs: list[Run],
    by_key: dict[tuple[int, str, int, str], Run],
    mode: str,
    clients: int,
    target: str,
    rounds: int,
) -> dict[str, float | None]:
    """Median p50/p99 latency, and the median per-round latency added over direct's."""
    own = [r for r in runs if (r.mode, r.clients, r.target) == (mode, clients, target)]
    out: dict[str, float | None] = {
        "p50_us": _median([r.p50_us for r in own if r.p50_us is not None]),
        "p99_us": _median([r.p99_us for r in own if r.p99_us is not None]),
    }
    for q in ("p50", "p99"):
        added = []
        for rnd in range(1, rounds + 1):
            a = by_key.get((rnd, mode, clients, target))
            b = by_key.get((rnd, mode, clients, "direct"))
            if a and b and getattr(a, f"{q}_us") is not None and getattr(b, f"{q}_us"):
                added.append(getattr(a, f"{q}_us") - getattr(b, f"{q}_us"))
        out[f"added_{q}_us"] = _median(added) if target != "direct" else None
    return out


def render_latency(rows: list[dict], markdown: bool) -> str:
    """Latency at 1 client: p50/p99 per target, what each proxy adds over direct, and
    pgwarden's added p50 as a multiple of PgBouncer's."""
    bouncer = {
        (r["mode"], r["clients"]): r["added_p50_us"] for r in rows if r["target"] == "pgbouncer"
    }
    header = ["mode", "clients", "target", "p50 µs", "p99 µs", "added p50", "added p99"]
    header.append("added p50 vs pgbouncer")
    table = []
    for row in rows:
        if row["p50_us"] is None:
            continue
        ref = bouncer.get((row["mode"], row["clients"]))
        own = row["added_p50_us"]
        times = own / ref if own is not None and ref and row["target"] != "pgbouncer" else None
        line = [row["mode"], str(row["clients"]), row["target"]]
        line += [
            _cell(row["p50_us"], ".0f", row["disturbed"]),
            _cell(row["p99_us"], ".0f", row["disturbed"]),
            _cell(own, ".0f", row["disturbed"]),
            _cell(row["added_p99_us"], ".0f", row["disturbed"]),
            _cell(times, ".2f", row["disturbed"]),
        ]
        table.append(line)
    return _table(header, table, markdown) if table else ""


def _cell(value: float | None, spec: str, disturbed: bool) -> str:
    return "-" if value is None else format(value, spec) + ("*" if disturbed else "")


def render(rows: list[dict], targets: list[str], markdown: bool) -> str:
    """The summary as an aligned text table or as a Markdown table."""
    header = ["mode", "clients", "target", "tps", "proxy CPU µs/tx"]
    refs = [ref for ref in ("direct", "pgbouncer") if ref in targets]
    header += [f"vs {ref}" for ref in refs]
    table = []
    for row in rows:
        line = [row["mode"], str(row["clients"]), row["target"]]
        line.append(_cell(row["tps"], ".0f", row["disturbed"]))
        line.append(_cell(row["cpu_us_per_tx"], ".1f", row["disturbed"]))
        line += [_cell(row[f"vs_{ref}"], ".2f", row[f"vs_{ref}_disturbed"]) for ref in refs]
        table.append(line)
    return _table(header, table, markdown)


def _table(header: list[str], table: list[list[str]], markdown: bool) -> str:
    left = 3  # the first columns are text, the rest numbers
    if markdown:
        rule = ["---"] * left + ["---:"] * (len(header) - left)
        return "\n".join("| " + " | ".join(line) + " |" for line in [header, rule, *table])
    widths = [max(len(line[i]) for line in [header, *table]) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.ljust(width) if i < left else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in [header, *table]
    )


def notes(runs: list[Run], args: argparse.Namespace, machine: dict[str, Any]) -> list[str]:
    """What the table's numbers are, which runs were disturbed or failed, on what machine."""
    lines = [
        f"pgbench -S -n -T {args.duration:g} (-j min(clients, 2)), scale {args.scale}, "
        f"{args.rounds} round(s) interleaved; tps and µs/tx are medians, 'vs X' the median of "
        "per-round ratios measured side by side. 1-client figures are a lower bound (idle "
        "vCPUs waking up shape them). Latency (1 client): p50/p99 of every transaction in "
        "pgbench's log; 'added' is the median per-round difference to direct."
    ]
    disturbed = [r for r in runs if r.disturbed]
    if disturbed:
        loads = sorted(r.other_load for r in disturbed)
        where = ", ".join(
            f"round {r.round} {r.mode} c={r.clients} {r.target} ({r.other_load:.2f})"
            for r in disturbed
        )
        if len(disturbed) > LIST_DISTURBED:  # the JSON has them all
            where = f"{len(disturbed)} of {len(runs)} runs ({loads[0]:.2f}-{loads[-1]:.2f} cores)"
        lines.append(
            f"* other load above {OTHER_LOAD_LIMIT:.2f} of a core during {where}; "
            "rerun on a quiet machine before quoting those figures."
        )
    lines += [
        f"failed: round {r.round} {r.mode} c={r.clients} {r.target}: {r.error}"
        for r in runs
        if r.error
    ]
    lines.append(
        f"Machine: {machine['nproc']} CPUs ({machine['cpu']}); Python {machine['python']}; "
        f"PostgreSQL {machine['postgresql']}; PgBouncer {machine['pgbouncer'] or '-'}; "
        f"uvloop {machine['uvloop'] or 'not importable'}; pgwarden analysis "
        f"{machine['analysis_code']}."
    )
    return lines


def machine_info(cluster: LocalCluster, pgbouncer: str | None) -> dict[str, Any]:
    """What the figures depend on, so a table quoted in a README says where it came from."""
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    bouncer_version = None
    if pgbouncer:
        out = subprocess.run([pgbouncer, "--version"], capture_output=True, text=True).stdout
        bouncer_version = out.split("\n", 1)[0].removeprefix("PgBouncer ").strip()
    try:
        import uvloop

        uvloop_version: str | None = uvloop.__version__
    except ImportError:
        uvloop_version = None
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": model.group(1).strip() if model else platform.machine(),
        "python": platform.python_version(),
        "postgresql": cluster.psql("SHOW server_version").strip(),
        "pgbouncer": bouncer_version,
        "uvloop": uvloop_version,
        "analysis_code": native.MODE,  # the pgwarden processes import the same package
    }


# --- command line ---------------------------------------------------------------------------


def _csv(allowed: tuple[str, ...] | None = None) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        if allowed is None:
            return [int(item) for item in items]
        bad = [item for item in items if item not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"{bad[0]!r} is not one of {', '.join(allowed)}")
        return items

    return parse


def _python(checkout: Path) -> str:
    return sys.executable if checkout == ROOT else str(checkout / ".venv" / "bin" / "python")


def _checkout(text: str) -> tuple[str, Path, Path | None]:
    name, sep, rest = text.partition("=")
    tree, _, config = rest.partition(":")
    path = Path(tree).resolve()
    if (
        not sep
        or not name
        or name in TARGETS
        or not Path(_python(path)).is_file()
        or (config and not Path(config).is_file())
    ):
        raise argparse.ArgumentTypeError(
            f"expected NAME=DIR[:YAMLFILE], DIR a checkout with its .venv, got {text!r}"
        )
    return name, path, Path(config) if config else None


def _variant(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or name in TARGETS or not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"expected NAME=YAMLFILE with a new name, got {text!r}")
    return name, Path(path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="pgbench select-only throughput direct, through pgwarden and PgBouncer, "
        "interleaved; quotes medians of per-round ratios and proxy CPU per transaction."
    )
    parser.add_argument("--duration", type=float, help="seconds per run (15; --quick: 3)")
    parser.add_argument("--rounds", type=int, help="rounds of every target (3; --quick: 1)")
    parser.add_argument("--warmup", type=float, help="seconds of warm-up per target (2)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 3 s, 1 round")
    parser.add_argument("--clients", type=_csv(), default=[1, 16], help="e.g. 1,16")
    parser.add_argument("--modes", type=_csv(MODES), default=["prepared", "simple"])
    parser.add_argument("--targets", type=_csv(TARGETS), default=list(TARGETS))
    parser.add_argument("--scale", type=int, default=10, help="pgbench -i scale (10)")
    parser.add_argument(
        "--extra-config", type=Path, help="YAML merged into every pgwarden target's config"
    )
    parser.add_argument(
        "--variant",
        type=_variant,
        action="append",
        default=[],
        metavar="NAME=YAMLFILE",
        help="another pgwarden target whose config also merges this file (repeatable)",
    )
    parser.add_argument(
        "--checkout",
        type=_checkout,
        action="append",
        default=[],
        metavar="NAME=DIR[:YAMLFILE]",
        help="another pgwarden target run from another checkout (its .venv, e.g. a worktree "
        "of an earlier commit), its config merging YAMLFILE if given (repeatable)",
    )
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args(argv)
    quick = args.quick
    args.duration = args.duration or (3.0 if quick else 15.0)
    args.rounds = args.rounds or (1 if quick else 3)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if quick else 2.0)
    names = [name for name, _ in args.variant] + [name for name, _, _ in args.checkout]
    if len(set(names)) != len(names):
        parser.error("variant and checkout names must differ")
    return args


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the cleanup below runs either way."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    """Start everything, measure, stop everything, then report; exit 1 if a run failed."""
    args = parse_args(argv)
    base = _load_yaml(args.extra_config) if args.extra_config else {}
    base = deep_merge({"logging": {"format": "json", "level": "warning"}}, base)
    configs = {"pgwarden": base} if "pgwarden" in args.targets else {}
    configs |= {name: deep_merge(base, _load_yaml(path)) for name, path in args.variant}
    configs |= {
        name: deep_merge(base, _load_yaml(path)) if path else base
        for name, _, path in args.checkout
    }
    pgbouncer = find_pgbouncer() if "pgbouncer" in args.targets else None
    extra = len(args.variant) + len(args.checkout)
    per_run = len(args.modes) * len(args.clients) * (len(args.targets) + extra)
    minutes = per_run * args.rounds * (args.duration + 1) / 60
    print(
        f"{per_run * args.rounds} runs of {args.duration:g} s: ~{minutes:.1f} min", file=sys.stderr
    )

    with _terminate_as_interrupt(), contextlib.ExitStack() as stack:
        # shared_buffers holds the whole pgbench data set at the default scale.
        settings = {"shared_buffers": "512MB"}
        cluster = stack.enter_context(
            LocalCluster(ssl=False, password_roles=False, settings=settings)
        )
        workdir = Path(tempfile.mkdtemp(prefix="pgwarden-bench-"))
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        workdir.chmod(0o755)  # the postgres user must reach its PgBouncer directory
        pgbench = str(cluster.bindir / "pgbench")
        init = [pgbench, "-i", "-q", "-s", str(args.scale), "-h", cluster.host]
        init += ["-p", str(cluster.port), "-U", cluster.superuser, "postgres"]
        print(f"pgbench -i -s {args.scale} ...", file=sys.stderr)
        result = subprocess.run(init, capture_output=True, text=True, timeout=600, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"pgbench -i failed:\n{result.stderr}")

        targets: list[Target] = []
        for name in args.targets:
            if name == "direct":
                targets.append(Target("direct", cluster.port))
            elif name == "pgbouncer" and pgbouncer:
                targets.append(start_pgbouncer(stack, pgbouncer, cluster, workdir))
            elif name == "pgwarden":
                targets.append(start_pgwarden(stack, name, configs[name], cluster.port, workdir))
        for name, _ in args.variant:
            targets.append(start_pgwarden(stack, name, configs[name], cluster.port, workdir))
        for name, tree, _ in args.checkout:
            targets.append(
                start_pgwarden(stack, name, configs[name], cluster.port, workdir, checkout=tree)
            )

        postmaster = int((cluster.datadir / "postmaster.pid").read_text().split()[0])
        bench = Bench(pgbench, postmaster, cluster.superuser, workdir)
        machine = machine_info(cluster, pgbouncer)
        started = time.strftime("%Y%m%d-%H%M%S")
        runs = measure(bench, targets, args)

    names = [target.name for target in targets]
    rows = summarize(runs, names, args)
    print(render(rows, names, args.markdown))
    print()
    latency = render_latency(rows, args.markdown)
    if latency:
        print(latency)
        print()
    print(("\n\n" if args.markdown else "\n").join(notes(runs, args, machine)))
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"{started}.json"
    record = {
        "started": started,
        "args": vars(args),
        "pgwarden_configs": configs,
        "machine": machine,
        "runs": [asdict(run) for run in runs],
        "summary": rows,
    }
    out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"raw results: {out.relative_to(ROOT)}", file=sys.stderr)
    return 1 if any(run.error for run in runs) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # during setup; everything started is already stopped
        sys.exit(130)
    except RuntimeError as exc:  # a target failed to start; its log tail is in the message
        sys.exit(f"bench: {exc}")

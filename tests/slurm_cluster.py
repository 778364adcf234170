"""A real single-node SLURM cluster for the tests: munged + slurmctld + slurmd in a temporary folder.

Debian's `slurm-wlm` and `munge` packages, no systemd, run as root (`tools/sysdeps.sh` installs them).
Every cluster is private: its own munge socket and key, its own ports, state, spool, pid and log files,
so two test sessions on one machine (or a system munged/slurm) do not interfere. The daemons are
stopped by their pid files, never by name.

    with SlurmCluster() as c:
        job = c.run(['sbatch', '--parsable', '--wrap', 'hostname']).stdout.strip()

`c.env` is the environment (with `SLURM_CONF`) for any subprocess that talks to the cluster; `with c.activated():`
sets `SLURM_CONF` in this process for libraries that call sbatch themselves (dask-jobqueue). The pytest fixture
`slurm_cluster` (session scope, re-exported by conftest.py) yields one started cluster.
"""

from __future__ import annotations
import contextlib, os, pwd, shutil, signal, socket, subprocess, tempfile, time
from pathlib import Path
import pytest

__all__ = ['SlurmCluster', 'slurm_available', 'free_port', 'slurm_cluster']


def slurm_available() -> str | None:
    "None when every program the cluster needs is on PATH (and we are root), else what is missing."
    missing = [
        p
        for p in ('munged', 'mungekey', 'slurmctld', 'slurmd', 'sbatch', 'scontrol', 'srun', 'sinfo')
        if shutil.which(p) is None
    ]
    if missing:
        return f"missing {', '.join(missing)}: install the Debian packages slurm-wlm and munge (tools/sysdeps.sh does)"
    if os.geteuid() != 0:
        return "starting a SLURM cluster needs root (slurmd runs jobs as their user)"
    try:
        pwd.getpwnam('munge')
    except KeyError:
        return "no 'munge' user: reinstall the Debian package munge"
    return None


def free_port() -> int:
    "A TCP port on 127.0.0.1 that nothing listens on right now."
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _mem_total_mb() -> int:
    for line in Path('/proc/meminfo').read_text().splitlines():
        if line.startswith('MemTotal:'):
            return int(line.split()[1]) // 1024
    return 4096


class SlurmCluster:
    "A private single-node SLURM cluster (node `localhost`, partition `debug`) living in a temporary folder."

    node = 'localhost'
    partition = 'debug'

    def __init__(
        self,
        root: str | Path | None = None,  # folder for config, state and logs (a fresh temp dir if None)
        cpus: int = 2,  # CPUs the node offers (slurmd is told to trust the config, not the hardware)
        real_memory_mb: int
        | None = None,  # memory the node offers; default: a quarter of the machine's, at most 4 GiB
        startup_timeout: float = 30.0,
    ):  # seconds to wait for the node to become idle
        # munged runs as the munge user: its folder must be reachable by it, so not under pytest's 0700 tmp dirs
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix='seaice-slurm-'))
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        self.cpus, self.startup_timeout = cpus, startup_timeout
        self.real_memory_mb = real_memory_mb or max(256, min(4096, _mem_total_mb() // 4))
        self.conf = self.root / 'slurm.conf'
        self.munge_dir = self.root / 'munge'
        self.munge_socket = self.munge_dir / 'munge.socket'
        self.env = {**os.environ, 'SLURM_CONF': str(self.conf)}
        for k in [
            k
            for k in self.env
            if k.startswith(('SLURM_', 'SBATCH_', 'SRUN_', 'SALLOC_')) and k != 'SLURM_CONF'
        ]:
            del self.env[k]  # a test session running inside a SLURM job must not leak its job into ours
        self.pid_files = {
            'slurmd': self.root / 'slurmd.pid',
            'slurmctld': self.root / 'slurmctld.pid',
            'munged': self.munge_dir / 'munged.pid',
        }
        self.started = False

    # ---- configuration -------------------------------------------------------------------------
    def write_config(self) -> Path:
        "Write slurm.conf (private ports, paths under `root`) and return its path."
        for d in ('state', 'spool', 'log'):
            (self.root / d).mkdir(exist_ok=True)
        self.ctld_port, self.slurmd_port = free_port(), free_port()
        r = self.root
        keys = dict(
            ClusterName='seaice',
            SlurmctldHost='localhost',
            SlurmctldPort=self.ctld_port,
            SlurmdPort=self.slurmd_port,
            SlurmUser='root',
            SlurmdUser='root',
            AuthType='auth/munge',
            CredType='cred/munge',
            AuthInfo=f'socket={self.munge_socket}',
            StateSaveLocation=r / 'state',
            SlurmdSpoolDir=r / 'spool',
            SlurmctldPidFile=self.pid_files['slurmctld'],
            SlurmdPidFile=self.pid_files['slurmd'],
            SlurmctldLogFile=r / 'log' / 'slurmctld.log',
            SlurmdLogFile=r / 'log' / 'slurmd.log',
            ProctrackType='proctrack/linuxproc',
            TaskPlugin='task/none',
            SelectType='select/cons_tres',
            SelectTypeParameters='CR_Core_Memory',
            SchedulerType='sched/backfill',
            JobAcctGatherType='jobacct_gather/none',
            AccountingStorageType='accounting_storage/none',
            JobCompType='jobcomp/none',
            MpiDefault='none',
            ReturnToService=2,
            SlurmdParameters='config_overrides',  # trust CPUs/RealMemory below, whatever the hardware says
            MinJobAge=600,  # keep finished jobs visible to `scontrol show job` (no sacct here)
            KillWait=2,
            InactiveLimit=0,
            SlurmctldTimeout=30,
            SlurmdTimeout=30,
            MessageTimeout=20,
            SchedulerParameters='batch_sched_delay=0',  # start batch jobs at once (default: up to 3 s later)
            DefMemPerCPU=max(64, self.real_memory_mb // (4 * self.cpus)),
        )
        lines = [f"{k}={v}" for k, v in keys.items()]
        lines += [
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.real_memory_mb} State=UNKNOWN",
            f"PartitionName={self.partition} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text('\n'.join(lines) + '\n')
        return self.conf

    # ---- daemons ------------------------------------------------------------------------------
    def _start_munged(self):
        "Start a private munged (as the munge user) with its own key and socket."
        d = self.munge_dir
        d.mkdir(exist_ok=True)
        key = d / 'munge.key'
        if not key.exists():
            subprocess.run(['mungekey', '--create', f'--keyfile={key}'], check=True, capture_output=True)
        shutil.chown(d, 'munge', 'munge')
        os.chmod(d, 0o755)
        shutil.chown(key, 'munge', 'munge')
        os.chmod(key, 0o400)
        subprocess.run(
            [
                'munged',
                f'--socket={self.munge_socket}',
                f'--key-file={key}',
                f'--pid-file={self.pid_files["munged"]}',
                f'--log-file={d / "munged.log"}',
                f'--seed-file={d / "munged.seed"}',
            ],
            check=True,
            capture_output=True,
            user='munge',
            group='munge',
        )
        self._wait(lambda: self.munge_socket.exists(), 10, 'munged socket')

    def start(self) -> 'SlurmCluster':
        "Write the config and start munged, slurmctld and `slurmd -N localhost`; return when the node is idle."
        if self.started:
            return self
        self.write_config()
        try:
            self._start_munged()
            self.run(['slurmctld'], check=True)
            self._wait(
                lambda: self.run(['scontrol', 'ping']).stdout.count('UP') > 0,
                self.startup_timeout,
                'slurmctld',
            )
            self.run(['slurmd', '-N', self.node], check=True)
            self._wait(lambda: self.node_state() == 'idle', self.startup_timeout, f'node {self.node} idle')
        except BaseException:
            self.stop()
            raise
        self.started = True
        return self

    def node_state(self) -> str:
        "The node's state as sinfo prints it (`idle`, `alloc`, `mix`, `down*`, ...)."
        return self.run(['sinfo', '-h', '-N', '-o', '%t']).stdout.strip()

    def _wait(self, cond, timeout: float, what: str):
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if cond():
                return
            time.sleep(0.2)
        raise RuntimeError(
            f"SLURM test cluster: timed out after {timeout:.0f} s waiting for {what}; logs in {self.root / 'log'}:\n"
            + self.logs(tail=20)
        )

    def logs(self, tail: int = 40) -> str:
        "The last `tail` lines of each daemon log."
        out = []
        for p in [*(self.root / 'log').glob('*.log'), self.munge_dir / 'munged.log']:
            if p.exists():
                out.append(f"--- {p.name}\n" + '\n'.join(p.read_text(errors='replace').splitlines()[-tail:]))
        return '\n'.join(out)

    def stop(self):
        "Stop slurmd, slurmctld and munged by their pid files (SIGTERM to all, SIGKILL to any left after 10 s)."
        pids = []
        for name in ('slurmd', 'slurmctld', 'munged'):
            try:
                pid = int(self.pid_files[name].read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            try:
                os.kill(pid, signal.SIGTERM)
                pids.append(pid)
            except ProcessLookupError:
                pass
        t0 = time.monotonic()
        while pids and time.monotonic() - t0 < 10:
            pids = [p for p in pids if _alive(p)]
            time.sleep(0.1)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.started = False

    def cleanup(self):
        "Stop the daemons and remove the cluster folder."
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    # ---- helpers for tests ------------------------------------------------------------------------
    def run(
        self, cmd: list[str] | str, check: bool = False, timeout: float = 60, **kw
    ) -> subprocess.CompletedProcess:
        "Run a command (list, or a string for the shell) against this cluster; capture text output."
        kw.setdefault('cwd', self.root)  # sbatch writes slurm-<id>.out into the working directory
        r = subprocess.run(
            cmd,
            shell=isinstance(cmd, str),
            env={**self.env, **kw.pop('env', {})},
            capture_output=True,
            text=True,
            timeout=timeout,
            **kw,
        )
        if check and r.returncode != 0:
            raise RuntimeError(
                f"{cmd!r} exited {r.returncode}:\n{r.stdout}\n{r.stderr}\n{self.logs(tail=15)}"
            )
        return r

    def sbatch(self, *args: str) -> str:
        "Submit with `sbatch --parsable ARGS...` and return the job id."
        return self.run(['sbatch', '--parsable', *args], check=True).stdout.strip().split(';')[0]

    def job(self, job_id: str) -> dict:
        "`scontrol show job -o` of one job as a dict (first line for an array)."
        out = self.run(['scontrol', 'show', 'job', '-o', str(job_id)], check=True).stdout.splitlines()[0]
        return dict(kv.split('=', 1) for kv in out.split() if '=' in kv)

    def wait_job(self, job_id: str, timeout: float = 60) -> dict:
        "Wait until a job leaves PENDING/RUNNING/COMPLETING and return its record."
        done = {}

        def finished():
            done.update(self.job(job_id))
            return done['JobState'] not in ('PENDING', 'RUNNING', 'CONFIGURING', 'COMPLETING', 'SUSPENDED')

        self._wait(finished, timeout, f'job {job_id}')
        return done

    @contextlib.contextmanager
    def activated(self):
        "Point this process's `SLURM_CONF` at the cluster while inside the block (for libraries such as dask-jobqueue that call sbatch themselves)."
        old = os.environ.get('SLURM_CONF')
        os.environ['SLURM_CONF'] = str(self.conf)
        try:
            yield self
        finally:
            if old is None:
                os.environ.pop('SLURM_CONF', None)
            else:
                os.environ['SLURM_CONF'] = old

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.cleanup()


@pytest.fixture(scope='session')
def slurm_cluster():
    "A running private single-node SLURM cluster, shared by the whole test session (skips locally, fails in CI, without slurm)."
    from conftest import require, require_tool  # late import: conftest imports this module

    require_tool('slurmctld', 'slurm-wlm')
    require_tool('munged', 'munge')
    missing = slurm_available()
    require(missing is None, f"SLURM test cluster unavailable: {missing}")
    cluster = SlurmCluster().start()
    try:
        yield cluster
    finally:
        cluster.cleanup()

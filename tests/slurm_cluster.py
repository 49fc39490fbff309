# **************************************************************************
# *
# * Authors:     the deepcryo developers
# *
# * This program is free software; you can redistribute it and/or modify
# * it under the terms of the GNU General Public License as published by
# * the Free Software Foundation; either version 3 of the License, or
# * (at your option) any later version.
# *
# * This program is distributed in the hope that it will be useful,
# * but WITHOUT ANY WARRANTY; without even the implied warranty of
# * MERCHANTABILITY or FITNESS FOR A PARTICULAR PURPOSE.  See the
# * GNU General Public License for more details.
# *
# * You should have received a copy of the GNU General Public License
# * along with this program.  If not, see <https://www.gnu.org/licenses/>.
# *
# **************************************************************************
"""A real, single-node SLURM cluster for tests: Debian's ``slurm-wlm`` and ``munge`` started in a temporary
folder, stopped by the pids in their pid files at the end.

Usage, as a context manager or as the module-scoped pytest fixture ``slurm``::

    with slurm_cluster() as cluster:            # skips the test (one line) where it cannot run
        subprocess.run(["sbatch", "-p", cluster.partition, "job.sh"], env=cluster.environ(), check=True)

    def test_x(slurm):                          # from slurm_cluster import slurm
        ...

Everything the cluster writes lives in its state folder (``cluster.state_dir``): ``slurm.conf``, its own
``munged`` (own key and socket, so it never touches a system munge), state, spool, pid and log files, and
``jobcomp.txt``, one line per finished job with its id, name, node and start/end times (the test cluster has no
accounting database, so ``sacct`` does not work; :meth:`SlurmCluster.finishedJobs` reads that file). Ports are
free ones chosen at start, so several test clusters may run on one machine. While the cluster is up,
``SLURM_CONF`` in ``os.environ`` points at its ``slurm.conf``: ``sbatch``/``squeue``/``srun`` run by the test and by
the processes it starts (Scipion protocol runs) talk to it.

Needs root (the daemons run as root, jobs run as the submitting user); installs ``slurm-wlm munge`` with apt-get
when they are missing. Skips (``pytest.skip``, one line) when not root, when they are missing and cannot be
installed, or when the node does not become idle within ``START_TIMEOUT_S``.
"""
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

import pytest

#: Longest wait for the node to become idle after the daemons start, in s.
START_TIMEOUT_S = 60
#: Longest wait for a daemon to exit after SIGTERM before it gets SIGKILL, in s.
STOP_TIMEOUT_S = 15
PACKAGES = ("slurm-wlm", "munge")
DAEMONS = ("slurmctld", "slurmd", "munged")


@dataclass
class SlurmCluster:
    """A running test cluster: one node (``hostname``) with ``cpus`` CPUs in partition ``partition``."""

    state_dir: str
    hostname: str
    partition: str
    cpus: int
    conf: str = field(init=False)
    munge_socket: str = field(init=False)

    def __post_init__(self):
        self.conf = os.path.join(self.state_dir, "slurm.conf")
        self.munge_socket = os.path.join(self.state_dir, "munge", "munge.socket")

    def path(self, *names):
        """A file of the cluster's state folder (e.g. ``path('slurmctld.log')``)."""
        return os.path.join(self.state_dir, *names)

    def environ(self, base=None):
        """``base`` (default ``os.environ``) with ``SLURM_CONF`` of this cluster, for SLURM commands."""
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = self.conf
        return env

    def run(self, *command, check=True):
        """Run a SLURM client command (``sinfo``, ``squeue``, ``sbatch``, ...) against this cluster; its stdout."""
        return subprocess.run(command, env=self.environ(), check=check, capture_output=True, text=True).stdout

    def nodeState(self):
        """The node's state as ``sinfo`` prints it (``idle``, ``mix``, ``alloc``, ``down*``, ...), '' if unknown."""
        result = subprocess.run(["sinfo", "-h", "-n", self.hostname, "-o", "%t"], env=self.environ(),
                                capture_output=True, text=True, timeout=20)
        return result.stdout.strip() if result.returncode == 0 else ""

    def finishedJobs(self):
        """Finished jobs, from ``jobcomp.txt``: a list of dicts with the keys SLURM writes (``JobId``, ``Name``,
        ``JobState``, ``NodeList``, ``StartTime``, ``EndTime``, ...; times as ``YYYY-MM-DDTHH:MM:SS``)."""
        jobs = []
        with contextlib.suppress(FileNotFoundError), open(self.path("jobcomp.txt")) as lines:
            for line in lines:
                jobs.append(dict(item.split("=", 1) for item in line.split() if "=" in item))
        return jobs

    def waitForJobs(self, timeout_s=600, poll_s=1.0):
        """Wait until the queue is empty (every job submitted so far has ended); fails after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while self.run("squeue", "-h", "-o", "%i").strip():
            if time.monotonic() > deadline:
                raise AssertionError("SLURM jobs still queued after %.0f s:\n%s" % (timeout_s, self.run("squeue")))
            time.sleep(poll_s)


def _freePorts(count):
    """``count`` distinct TCP ports that are free now."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _slurmConf(cluster, ctldPort, slurmdPort, realMemoryMB):
    """The ``slurm.conf`` of a one-node cluster whose files all live in the cluster's state folder."""
    d, h = cluster.state_dir, cluster.hostname
    return "\n".join([
        "ClusterName=deepcryotest",
        "SlurmctldHost=%s(127.0.0.1)" % h,
        "SlurmctldPort=%d" % ctldPort,
        "SlurmdPort=%d" % slurmdPort,
        "SlurmUser=root",
        "AuthType=auth/munge",
        "AuthInfo=socket=%s" % cluster.munge_socket,
        "CredType=cred/munge",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "SchedulerType=sched/builtin",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        # The node is declared, not probed: tests may declare more CPUs than the machine has.
        "SlurmdParameters=config_overrides",
        "MpiDefault=none",
        "MailProg=/bin/true",
        "StateSaveLocation=%s/state" % d,
        "SlurmdSpoolDir=%s/spool" % d,
        "SlurmctldPidFile=%s/slurmctld.pid" % d,
        "SlurmdPidFile=%s/slurmd.pid" % d,
        "SlurmctldLogFile=%s/slurmctld.log" % d,
        "SlurmdLogFile=%s/slurmd.log" % d,
        "JobCompType=jobcomp/filetxt",
        "JobCompLoc=%s/jobcomp.txt" % d,
        "ReturnToService=2",
        "InactiveLimit=0",
        "KillWait=5",
        "NodeName=%s NodeAddr=127.0.0.1 CPUs=%d Sockets=1 CoresPerSocket=%d ThreadsPerCore=1 RealMemory=%d "
        "State=UNKNOWN" % (h, cluster.cpus, cluster.cpus, realMemoryMB),
        "PartitionName=%s Nodes=%s Default=YES MaxTime=INFINITE State=UP" % (cluster.partition, h),
        "",
    ])


def _install():
    """``apt-get install slurm-wlm munge`` when their programs are missing; the reason it cannot, or None."""
    if all(shutil.which(p) for p in DAEMONS + ("sbatch", "sinfo")):
        return None
    if not shutil.which("apt-get"):
        return "slurm-wlm/munge are not installed and there is no apt-get to install them"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            lines = (result.stderr or result.stdout).strip().splitlines() or ["exit %d" % result.returncode]
            return "could not install slurm-wlm/munge (%s: %s)" % (" ".join(command[:2]), lines[-1])
    return None


def _readPid(pidFile):
    try:
        with open(pidFile) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours would still answer signal 0; the daemons fork away from us, so reap if we can.
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return True


def _stopDaemon(pidFile):
    """SIGTERM the daemon whose pid is in ``pidFile``, SIGKILL after ``STOP_TIMEOUT_S``."""
    pid = _readPid(pidFile)
    if pid is None or not _alive(pid):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while _alive(pid):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.2)


def _lastLine(path):
    with contextlib.suppress(OSError), open(path) as f:
        lines = [line.strip() for line in f if line.strip()]
        if lines:
            return lines[-1]
    return "no log"


def _start(cluster):
    """Start munged, slurmctld and slurmd of ``cluster``; the reason they did not come up, or None."""
    d = cluster.state_dir
    for sub in ("state", "spool", "munge"):
        os.makedirs(os.path.join(d, sub), mode=0o700, exist_ok=True)
    keyFile = cluster.path("munge", "munge.key")
    with open(keyFile, "wb") as f:
        f.write(os.urandom(1024))
    os.chmod(keyFile, 0o400)
    # --force: munged refuses to run as root otherwise; it still checks its own files' permissions.
    subprocess.run(["munged", "--force", "--socket=%s" % cluster.munge_socket, "--key-file=%s" % keyFile,
                    "--pid-file=%s" % cluster.path("munge", "munged.pid"),
                    "--log-file=%s" % cluster.path("munge", "munged.log"),
                    "--seed-file=%s" % cluster.path("munge", "munged.seed")],
                   capture_output=True, text=True)
    if not os.path.exists(cluster.munge_socket):
        return "munged did not start (%s)" % _lastLine(cluster.path("munge", "munged.log"))
    env = cluster.environ()
    subprocess.run(["slurmctld", "-f", cluster.conf], env=env, capture_output=True)
    subprocess.run(["slurmd", "-f", cluster.conf, "-N", cluster.hostname], env=env, capture_output=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if cluster.nodeState() == "idle":
            return None
        time.sleep(0.5)
    return "the SLURM node did not become idle in %d s (state %r; slurmctld: %s; slurmd: %s)" % (
        START_TIMEOUT_S, cluster.nodeState(), _lastLine(cluster.path("slurmctld.log")),
        _lastLine(cluster.path("slurmd.log")))


def stop(cluster):
    """Stop the cluster's daemons by the pids in their pid files (slurmd, slurmctld, then munged)."""
    for pidFile in ("slurmd.pid", "slurmctld.pid", os.path.join("munge", "munged.pid")):
        _stopDaemon(cluster.path(pidFile))


@contextlib.contextmanager
def slurm_cluster(cpus=None, partition="debug", keep=False):
    """Start a one-node SLURM cluster, yield its :class:`SlurmCluster`, stop it afterwards.

    Args:
        cpus: CPUs of the node (default: the CPUs this process may use, ``nproc``, and at least 2 so that two
            one-CPU jobs can run side by side on any machine: the node is declared, not probed).
        partition: name of its one (default) partition.
        keep: keep the state folder (logs, ``jobcomp.txt``) after the stop; also with ``DEEPCRYO_KEEP_SLURM=1``.

    Skips the calling test (``pytest.skip``, one line) where it cannot run SLURM.
    """
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("SLURM test cluster: needs root (to run slurmctld/slurmd/munged)")
    problem = _install()
    if problem:
        pytest.skip("SLURM test cluster: %s" % problem)
    cpus = cpus or max(2, len(os.sched_getaffinity(0)))
    hostname = socket.gethostname().split(".")[0]
    realMemoryMB = max(1, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 // 2)
    cluster = SlurmCluster(tempfile.mkdtemp(prefix="deepcryo_slurm_"), hostname, partition, cpus)
    with open(cluster.conf, "w") as f:
        f.write(_slurmConf(cluster, *_freePorts(2), realMemoryMB))
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = cluster.conf
    try:
        problem = _start(cluster)
        if problem:
            pytest.skip("SLURM test cluster: %s" % problem)
        yield cluster
    finally:
        with contextlib.suppress(Exception):
            cluster.run("scancel", "--full", "-u", "root", check=False)
        stop(cluster)
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        if not (keep or os.environ.get("DEEPCRYO_KEEP_SLURM") == "1"):
            shutil.rmtree(cluster.state_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def slurm():
    """The test cluster of :func:`slurm_cluster` for the tests of one module."""
    with slurm_cluster() as cluster:
        yield cluster

"""Where a training process stands in a multi-process run: its rank, the world and the rendezvous address.

A landscape training runs as several DistributedDataParallel processes in one of three ways:

- ``local``: the program itself spawns one process per ``--device`` (``--device cuda:0,cuda:1`` or
  ``cpu,cpu``) and meets them on 127.0.0.1;
- ``slurm``: ``srun`` started the program once per task (``srun -n 8`` or ``--ntasks-per-node``); SLURM tells
  each task its rank (``SLURM_PROCID``), the step's task count (``SLURM_STEP_NUM_TASKS``, else
  ``SLURM_NTASKS``), its rank on its node (``SLURM_LOCALID``) and the step's nodes
  (``SLURM_STEP_NODELIST``, else ``SLURM_JOB_NODELIST``); rank 0 runs on the first node, which is the
  rendezvous host;
- ``torchrun``: torchrun (or any launcher of its convention) sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR`` and ``MASTER_PORT``. torchrun's variables win where both are present
  (``srun … torchrun …``: torchrun's ranks are the processes that train).

Under SLURM, ``MASTER_ADDR`` and ``MASTER_PORT``, where exported, override the first node and the port
derived from the job id (``15000 + SLURM_JOB_ID mod 10000``, below Linux's ephemeral ports; the same on every
task without any communication). A SLURM batch script itself (``sbatch --ntasks=4`` running the program
without ``srun``) is one process, not a rank: SLURM sets ``SLURM_PROCID`` and ``SLURM_NTASKS`` there too, but no
``SLURM_STEP_ID`` (SLURM 22.05), and the program runs locally.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Mapping, Sequence

from ..core.errors import InputError

__all__ = ["DistributedLaunch", "read_launch", "local_launch", "expand_hostlist", "rank_device"]

_SLURM_PORT_BASE = 15000


@dataclass(frozen=True)
class DistributedLaunch:
    """One process of a (possibly single-process) training run.

    Attributes:
        rank: this process's rank, 0 … ``world_size - 1``; rank 0 writes the outputs.
        world_size: number of processes training together (1: not distributed).
        local_rank: rank among the processes on this node (picks its GPU).
        master_addr: host name or address where rank 0 listens for the rendezvous.
        master_port: TCP port of the rendezvous (0 for a single process).
        source: ``"slurm"``, ``"torchrun"`` or ``"local"``.
    """
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str

    @property
    def init_method(self) -> str:
        """``tcp://host:port`` for :func:`torch.distributed.init_process_group` (IPv6 addresses bracketed)."""
        host = "[%s]" % self.master_addr if ":" in self.master_addr else self.master_addr
        return "tcp://%s:%d" % (host, self.master_port)


def local_launch(rank: int = 0, world_size: int = 1, port: int = 0) -> DistributedLaunch:
    """A process of a run the program spawned itself on this machine (``world_size`` 1: a plain run)."""
    return DistributedLaunch(rank, world_size, rank, "127.0.0.1", port, "local")


def _integer(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise InputError("%s=%r: not an integer" % (name, env[name]))


def _port(env: Mapping[str, str], name: str, value: int) -> int:
    if not 0 < value < 65536:
        raise InputError("%s=%r: not a TCP port (1-65535)" % (name, env.get(name, value)))
    return value


def _split_top_level(nodelist: str) -> List[str]:
    """``a[1-2],b`` → ``['a[1-2]', 'b']``: commas outside brackets separate host expressions."""
    items, depth, start = [], 0, 0
    for i, c in enumerate(nodelist):
        depth += (c == "[") - (c == "]")
        if depth < 0 or depth > 1:
            raise ValueError("unbalanced brackets")
        if c == "," and depth == 0:
            items.append(nodelist[start:i])
            start = i + 1
    if depth:
        raise ValueError("unbalanced brackets")
    items.append(nodelist[start:])
    return items


def _expand_item(item: str) -> List[str]:
    """One host expression (``rack[1-2]-n[01-02]``) → its hosts, the first bracket varying slowest."""
    m = re.fullmatch(r"([^\[\]]*)\[([^\[\]]+)\](.*)", item)
    if m is None:
        if not item or "[" in item or "]" in item:
            raise ValueError("empty or malformed host %r" % item)
        return [item]
    prefix, ranges, rest = m.groups()
    tails = _expand_item(rest) if rest else [""]
    hosts = []
    for part in ranges.split(","):
        lo, dash, hi = part.partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()) or (dash and int(hi) < int(lo)):
            raise ValueError("bad range %r" % part)
        numbers = ["%0*d" % (len(lo), i) for i in range(int(lo), int(hi) + 1)] if dash else [lo]
        hosts.extend(prefix + n + tail for n in numbers for tail in tails)
    return hosts


def expand_hostlist(nodelist: str) -> List[str]:
    """The host names of a SLURM host list, in SLURM's order (what ``scontrol show hostnames`` prints).

    ``node[01-03,07]`` → node01 node02 node03 node07 (zero padding kept from the range's lower bound);
    ``a,b`` → a b; ``gpu[1-2]-ib[0-1]`` → gpu1-ib0 gpu1-ib1 gpu2-ib0 gpu2-ib1. InputError for a malformed list.
    """
    try:
        return [host for item in _split_top_level(nodelist.strip()) for host in _expand_item(item)]
    except ValueError as exc:
        raise InputError("SLURM node list %r: not a host list (%s)" % (nodelist, exc))


def read_launch(env: Mapping[str, str]) -> DistributedLaunch:
    """This process's place in the run, from its launcher's environment variables (``os.environ``).

    torchrun's variables first, then an srun task's; a launcher that started a single process, or none,
    gives ``local_launch()`` (rank 0 of 1). InputError for an incomplete or malformed environment.
    """
    if "WORLD_SIZE" in env and "RANK" in env:
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
        if missing:
            raise InputError("RANK and WORLD_SIZE are set but not %s (start the ranks with torchrun)"
                             % " and ".join(missing))
        rank, world = _integer(env, "RANK"), _integer(env, "WORLD_SIZE")
        if world > 1:
            local = _integer(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
            return _checked(DistributedLaunch(rank, world, local, env["MASTER_ADDR"],
                                              _port(env, "MASTER_PORT", _integer(env, "MASTER_PORT")),
                                              "torchrun"))
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:  # an srun task (the batch script has no step id)
        tasks = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
        world = _integer(env, tasks) if tasks in env else 1
        if world > 1:
            nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
            if not env.get("MASTER_ADDR") and not nodes:
                raise InputError("srun task without SLURM_STEP_NODELIST or SLURM_JOB_NODELIST: "
                                 "no rendezvous host (export MASTER_ADDR)")
            addr = env.get("MASTER_ADDR") or expand_hostlist(nodes)[0]
            if env.get("MASTER_PORT"):
                port = _port(env, "MASTER_PORT", _integer(env, "MASTER_PORT"))
            elif "SLURM_JOB_ID" in env:
                port = _SLURM_PORT_BASE + _integer(env, "SLURM_JOB_ID") % 10000
            else:
                raise InputError("srun task without SLURM_JOB_ID: no rendezvous port (export MASTER_PORT)")
            rank = _integer(env, "SLURM_PROCID")
            local = _integer(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
            return _checked(DistributedLaunch(rank, world, local, addr, port, "slurm"))
    return local_launch()


def _checked(launch: DistributedLaunch) -> DistributedLaunch:
    if not 0 <= launch.rank < launch.world_size or launch.local_rank < 0:
        raise InputError("%s: rank %d, local rank %d of a world of %d processes"
                         % (launch.source, launch.rank, launch.local_rank, launch.world_size))
    return launch


def rank_device(launch: DistributedLaunch, devices: Sequence[str], visible_gpus: int) -> str:
    """The torch device of one rank started by srun or torchrun, from the program's ``--device``.

    Each such process is one rank, so ``devices`` (canonical names, :func:`deepcryo.core.cli.parse_devices`)
    name one kind: ``cpu`` (gloo), or one CUDA device, which stands for "this rank's GPU": ``cuda:0`` where the
    process sees a single GPU (``srun --gpus-per-task=1`` gives each task its own), ``cuda:<local rank>``
    where it sees the node's GPUs. ``visible_gpus``: ``torch.cuda.device_count()``.
    """
    if len(devices) != 1:
        raise InputError("--device %s: under %s each process is one rank; give --device cpu or --device cuda "
                         "(each rank takes the GPU of its local rank)" % (" ".join(devices), launch.source))
    if devices[0] == "cpu":
        return "cpu"
    if visible_gpus == 1:
        return "cuda:0"
    if launch.local_rank >= visible_gpus:
        raise InputError("local rank %d sees %d GPU(s): start at most one task per GPU on a node"
                         % (launch.local_rank, visible_gpus))
    return "cuda:%d" % launch.local_rank

"""The launcher environment of a landscape training (:mod:`deepcryo.landscape.distributed`), from fake
environments: what srun (variables as SLURM 22.05 sets them in a 2-task step, seen on the test cluster of
``slurm_cluster.py``) and torchrun give each process, and SLURM's host-list syntax."""
import pytest

from deepcryo.core.errors import InputError
from deepcryo.landscape.distributed import (DistributedLaunch, expand_hostlist, local_launch, rank_device,
                                            read_launch)

#: The variables of task 1 of ``srun -n 2`` inside ``sbatch -n 2`` (job 1, node vm), less the ones not read.
SRUN_TASK1 = {"SLURM_JOB_ID": "1", "SLURM_JOBID": "1", "SLURM_JOB_NODELIST": "vm", "SLURM_NODELIST": "vm",
              "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_NODEID": "0",
              "SLURM_STEPID": "0", "SLURM_STEP_ID": "0", "SLURM_STEP_NODELIST": "vm", "SLURM_STEP_NUM_TASKS": "2",
              "SLURM_STEP_NUM_NODES": "1"}
#: The batch script of that job: SLURM_PROCID and SLURM_NTASKS too, but no step.
BATCH_SCRIPT = {k: v for k, v in SRUN_TASK1.items() if "STEP" not in k} | {"SLURM_PROCID": "0",
                                                                           "SLURM_LOCALID": "0"}
TORCHRUN = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "gpu07", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "none"}


@pytest.mark.parametrize("nodelist, hosts", [
    ("vm", ["vm"]),
    ("a,b", ["a", "b"]),
    ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
    ("node[8-11]", ["node8", "node9", "node10", "node11"]),
    ("gpu[1-2]-ib[0-1]", ["gpu1-ib0", "gpu1-ib1", "gpu2-ib0", "gpu2-ib1"]),
    ("cn[098-100],login1,x[5]", ["cn098", "cn099", "cn100", "login1", "x5"]),
    ("n1.cluster.org,n2.cluster.org", ["n1.cluster.org", "n2.cluster.org"]),
])
def test_expand_hostlist(nodelist, hosts):
    assert expand_hostlist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["", "node[01-03", "node01-03]", "node[3-1]", "node[a-b]", "a,,b", "n[[1]]"])
def test_expand_hostlist_refuses_malformed_lists(nodelist):
    with pytest.raises(InputError, match="not a host list"):
        expand_hostlist(nodelist)


def test_no_launcher_and_single_process_launchers_are_local():
    assert read_launch({}) == local_launch() == DistributedLaunch(0, 1, 0, "127.0.0.1", 0, "local")
    assert read_launch(BATCH_SCRIPT).source == "local"  # sbatch -n 2 running the program without srun
    assert read_launch(dict(SRUN_TASK1, SLURM_STEP_NUM_TASKS="1", SLURM_PROCID="0")).world_size == 1
    assert read_launch(dict(TORCHRUN, RANK="0", WORLD_SIZE="1")) == local_launch()


def test_srun_task():
    launch = read_launch(SRUN_TASK1)
    assert launch == DistributedLaunch(1, 2, 1, "vm", 15001, "slurm")
    assert launch.init_method == "tcp://vm:15001"


def test_srun_task_across_nodes_meets_on_the_first_node_of_the_step():
    env = dict(SRUN_TASK1, SLURM_JOB_ID="1234567", SLURM_PROCID="5", SLURM_LOCALID="1", SLURM_NTASKS="8",
               SLURM_STEP_NUM_TASKS="8", SLURM_JOB_NODELIST="node[01-03,07]", SLURM_STEP_NODELIST="node[02-03,07]")
    assert read_launch(env) == DistributedLaunch(5, 8, 1, "node02", 15000 + 4567, "slurm")
    del env["SLURM_STEP_NODELIST"], env["SLURM_STEP_NUM_TASKS"]  # older srun: the job's variables
    assert read_launch(env) == DistributedLaunch(5, 8, 1, "node01", 19567, "slurm")
    exported = read_launch(dict(env, MASTER_ADDR="10.0.0.9", MASTER_PORT="40000"))
    assert (exported.master_addr, exported.master_port) == ("10.0.0.9", 40000)


def test_torchrun_wins_over_slurm():
    assert read_launch(TORCHRUN) == DistributedLaunch(3, 4, 1, "gpu07", 29500, "torchrun")
    assert read_launch(dict(SRUN_TASK1, **TORCHRUN)).source == "torchrun"  # srun … torchrun …
    assert read_launch(dict(TORCHRUN, MASTER_ADDR="fe80::1")).init_method == "tcp://[fe80::1]:29500"


@pytest.mark.parametrize("env, message", [
    ({"RANK": "0", "WORLD_SIZE": "2"}, "not MASTER_ADDR and MASTER_PORT"),
    (dict(TORCHRUN, WORLD_SIZE="four"), "WORLD_SIZE='four': not an integer"),
    (dict(TORCHRUN, MASTER_PORT="70000"), "MASTER_PORT='70000': not a TCP port"),
    (dict(TORCHRUN, RANK="4"), "rank 4, local rank 1 of a world of 4"),
    (dict(SRUN_TASK1, SLURM_STEP_NODELIST="vm[1-", SLURM_JOB_NODELIST="vm"), "not a host list"),
    ({k: v for k, v in SRUN_TASK1.items() if "NODELIST" not in k}, "no rendezvous host"),
    ({k: v for k, v in SRUN_TASK1.items() if "JOB" not in k}, "no rendezvous port"),
])
def test_bad_launcher_environments(env, message):
    with pytest.raises(InputError, match=message.replace("[", r"\[")):
        read_launch(env)


def test_rank_device():
    launch = read_launch(SRUN_TASK1)  # local rank 1
    assert rank_device(launch, ["cpu"], 0) == "cpu"
    assert rank_device(launch, ["cuda:0"], 4) == "cuda:1"  # the task sees the node's GPUs
    assert rank_device(launch, ["cuda:0"], 1) == "cuda:0"  # srun --gpus-per-task=1: its own one
    with pytest.raises(InputError, match="local rank 3 sees 2 GPU"):
        rank_device(DistributedLaunch(3, 4, 3, "h", 1, "slurm"), ["cuda:0"], 2)
    with pytest.raises(InputError, match="each process is one rank"):
        rank_device(launch, ["cuda:0", "cuda:1"], 2)

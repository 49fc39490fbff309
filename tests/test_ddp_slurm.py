"""The landscape VAE trained by processes that a launcher started, gloo on CPUs: two SLURM tasks (``sbatch -n 2``
with ``srun`` inside) on the one-node test cluster of ``tests/slurm_cluster.py``, and two torchrun
processes, against the same training started by the program itself.

Each launched process must become one rank of a 2-process DistributedDataParallel training (rank-tagged lines of
both ranks in the log, one model on both: equal parameter checksums), give the model, latents and history of the
program's own 2-process run (``--device cpu,cpu``: same sharding, same gloo reduction), and write the same files,
in the same format, as a single process. Without the launcher support the two processes train two independent
models into one folder and none of this holds. Tiny set (96 particles, 16 px working box, 2 epochs): seconds;
the SLURM test skips with one line where the cluster cannot run (not root, no slurm-wlm/munge).
"""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from deepcryo.core.mrc import read_mrc
from deepcryo.core.particles import read_particles
from deepcryo.core.simulate import phantom_states, write_particle_set
from deepcryo.landscape.train import CHECKPOINT, LATENT_STAR, VARIATION_MAP, latent_columns

from slurm_cluster import slurm_cluster

LATENT_DIM = 2
#: Per-process batch 8 on 2 ranks = the single process's 16: the same particles in each optimiser step.
OPTIONS = ["--latent-dim", str(LATENT_DIM), "--epochs", "2", "--box", "16", "--basis", "4", "--seed", "3"]
JOB_TIMEOUT_S = 300


def _train_command(star, out, *options):
    return [sys.executable, "-m", "deepcryo.landscape", "train", "--particles", star, "--output-dir", out,
            *OPTIONS, *options]


def _environ(base):
    """One torch thread per process (two ranks on a 2-core node); this checkout's deepcryo in every process."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return dict(base, OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join(p for p in (root, base.get("PYTHONPATH")) if p))


def _run_locally(star, out, *options):
    result = subprocess.run(_train_command(star, out, *options), env=_environ(os.environ), capture_output=True,
                            text=True, timeout=JOB_TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _outputs(folder):
    """(checkpoint dict, latent STAR, consensus map) of a training's output folder."""
    ckpt = torch.load(os.path.join(folder, CHECKPOINT), weights_only=True)
    return ckpt, read_particles(os.path.join(folder, LATENT_STAR)), read_mrc(os.path.join(folder, "consensus.mrc"))


def _checksums(log, world):
    """{rank: parameter checksum} from the ``rank r of <world> done`` lines of a log."""
    found = re.findall(r"^(?:\d+: )?rank (\d+) of %d done: parameter checksum (\S+)$" % world, log, re.M)
    return {int(rank): float(value) for rank, value in found}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The particle set and the local runs to compare with: one process, and the program's two (spawned)."""
    root = tmp_path_factory.mktemp("ddp")
    star = write_particle_set(str(root / "sim"), phantom_states(32, 2, seed=5), 96, 2.0, snr=0.1, seed=5)
    _run_locally(star, str(root / "single"), "--batch-size", "16")
    spawned_log = _run_locally(star, str(root / "spawned"), "--batch-size", "8", "--device", "cpu,cpu")
    sums = _checksums(spawned_log, 2)
    assert sorted(sums) == [0, 1] and sums[0] == sums[1], spawned_log
    return star, _outputs(str(root / "single")), _outputs(str(root / "spawned")), sums


def _check_launched_run(log, source, folder, runs):
    """The rank lines of ``source`` in ``log`` and the outputs in ``folder`` against the local runs."""
    _, single, spawned, spawned_sums = runs
    for rank in (0, 1):
        label = "%d: " % rank if source == "slurm" else ""  # srun --label: "<task>: " before the task's lines
        assert re.search(r"^%srank %d of 2 \(%s launch, local rank %d, rendezvous \S+:\d+, gloo on cpu\)$"
                         % (label, rank, source, rank), log, re.M), log
    assert _checksums(log, 2) == spawned_sums, log  # one model on both ranks, the program's own 2-process one
    launched = _outputs(folder)
    # The format of a single process's run: the same files, keys, shapes, columns and map.
    ckpt, ckpt1 = launched[0], single[0]
    assert sorted(os.listdir(folder)) == sorted([CHECKPOINT, LATENT_STAR, "consensus.mrc", VARIATION_MAP])
    assert ckpt.keys() == ckpt1.keys() and ckpt["epoch"] == ckpt1["epoch"] == 2
    assert {k: v.shape for k, v in ckpt["model"].items()} == {k: v.shape for k, v in ckpt1["model"].items()}
    assert dict(ckpt["config"], output_dir=None) == dict(ckpt1["config"], output_dir=None, batch_size=8)
    assert list(launched[1].particles) == list(single[1].particles)
    assert list(launched[1].particles["rlnImageName"]) == list(single[1].particles["rlnImageName"])
    np.testing.assert_array_equal(launched[2][0], single[2][0])
    # The result of the program's own 2-process training.
    torch.testing.assert_close(ckpt["model"], spawned[0]["model"])
    np.testing.assert_allclose(ckpt["history"], spawned[0]["history"], rtol=1e-6)
    columns = latent_columns(LATENT_DIM)
    np.testing.assert_allclose(np.stack([launched[1].particles[c] for c in columns], 1),
                               np.stack([spawned[1].particles[c] for c in columns], 1), rtol=1e-5, atol=1e-6)


def test_vae_trains_as_two_srun_ranks(runs, tmp_path):
    star = runs[0]
    out, log = str(tmp_path / "slurm"), str(tmp_path / "job.log")
    with slurm_cluster() as cluster:
        script = tmp_path / "train.sh"
        script.write_text("#!/bin/bash\nsrun --kill-on-bad-exit=1 --label %s\n" % " ".join(
            _train_command(star, out, "--batch-size", "8", "--device", "cpu")))
        job = subprocess.run(["sbatch", "--parsable", "-n", "2", "-J", "vae_ddp", "-o", log, str(script)],
                             env=_environ(cluster.environ()), capture_output=True, text=True, check=True)
        cluster.waitForJobs(timeout_s=JOB_TIMEOUT_S, poll_s=0.5)
        states = {j["JobId"]: j.get("JobState") for j in cluster.finishedJobs()}
    with open(log) as f:
        job_log = f.read()
    assert states.get(job.stdout.strip().split(";")[0]) == "COMPLETED", job_log
    _check_launched_run(job_log, "slurm", out, runs)


def test_vae_trains_as_two_torchrun_processes(runs, tmp_path):
    out = str(tmp_path / "torchrun")
    command = _train_command(runs[0], out, "--batch-size", "8", "--device", "cpu")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                             *command[1:]], env=_environ(os.environ), capture_output=True, text=True,
                            timeout=JOB_TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    _check_launched_run(result.stdout, "torchrun", out, runs)

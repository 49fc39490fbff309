"""The landscape VAE trained by two SLURM tasks (``sbatch -n 2`` with ``srun`` inside, gloo on CPUs) on the
one-node test cluster of :mod:`deepcryo.tests.slurm_cluster`, against the same training started locally.

Each srun task must become one rank of a 2-process DistributedDataParallel training (rank-tagged lines of both
ranks in the job log, one model on both: equal parameter checksums), give the model, latents and history of
the program's own 2-process run (``--device cpu,cpu``: same sharding, same gloo reduction), and write the same
files, in the same format, as a single process. Without the launcher support the two tasks train two
independent models into one folder and none of this holds. Tiny set (96 particles, 16 px working box, 2
epochs): seconds; skips with one line where the cluster cannot run (not root, no slurm-wlm/munge).
"""
import os
import re
import subprocess
import sys

import numpy as np
import torch

from deepcryo.core.mrc import read_mrc
from deepcryo.core.particles import read_particles
from deepcryo.core.simulate import phantom_states, write_particle_set
from deepcryo.landscape.train import CHECKPOINT, LATENT_STAR, latent_columns
from deepcryo.tests.slurm_cluster import slurm_cluster

LATENT_DIM = 2
#: Per-process batch 8 on 2 ranks = the single process's 16: the same particles in each optimiser step.
OPTIONS = ["--latent-dim", str(LATENT_DIM), "--epochs", "2", "--box", "16", "--basis", "4", "--seed", "3"]
JOB_TIMEOUT_S = 300


def _train_command(star, out, *options):
    return [sys.executable, "-m", "deepcryo.landscape", "train", "--particles", star, "--output-dir", out,
            *OPTIONS, *options]


def _environ(base):
    """One torch thread per process (two ranks on a 2-core node); this checkout's deepcryo in every process."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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


def test_vae_trains_as_two_srun_ranks(tmp_path):
    star = write_particle_set(str(tmp_path / "sim"), phantom_states(32, 2, seed=5), 96, 2.0, snr=0.1, seed=5)
    slurm_out, log = str(tmp_path / "slurm"), str(tmp_path / "job.log")
    with slurm_cluster() as cluster:
        script = tmp_path / "train.sh"
        script.write_text("#!/bin/bash\nsrun --kill-on-bad-exit=1 --label %s\n" % " ".join(
            _train_command(star, slurm_out, "--batch-size", "8", "--device", "cpu")))
        job = subprocess.run(["sbatch", "--parsable", "-n", "2", "-J", "vae_ddp", "-o", log, str(script)],
                             env=_environ(cluster.environ()), capture_output=True, text=True, check=True)
        cluster.waitForJobs(timeout_s=JOB_TIMEOUT_S, poll_s=0.5)
        states = {j["JobId"]: j.get("JobState") for j in cluster.finishedJobs()}
    with open(log) as f:
        job_log = f.read()
    assert states.get(job.stdout.strip().split(";")[0]) == "COMPLETED", job_log
    for rank in (0, 1):  # --label: "<task>: " before each line of that task
        assert re.search(r"^%d: rank %d of 2 \(slurm launch, local rank %d, rendezvous \S+:\d+, gloo on cpu\)$"
                         % (rank, rank, rank), job_log, re.M), job_log
    sums = _checksums(job_log, 2)
    assert sorted(sums) == [0, 1] and sums[0] == sums[1], job_log  # one model: the gradients were averaged

    single_out, spawned_out = str(tmp_path / "single"), str(tmp_path / "spawned")
    _run_locally(star, single_out, "--batch-size", "16")
    spawned_log = _run_locally(star, spawned_out, "--batch-size", "8", "--device", "cpu,cpu")
    assert _checksums(spawned_log, 2) == sums, spawned_log

    slurm, single, spawned = _outputs(slurm_out), _outputs(single_out), _outputs(spawned_out)
    # The format of a single process's run: the same files, keys, shapes, columns and map.
    assert sorted(os.listdir(slurm_out)) == sorted(os.listdir(single_out))
    ckpt, ckpt1 = slurm[0], single[0]
    assert ckpt.keys() == ckpt1.keys() and ckpt["epoch"] == ckpt1["epoch"] == 2
    assert {k: v.shape for k, v in ckpt["model"].items()} == {k: v.shape for k, v in ckpt1["model"].items()}
    assert dict(ckpt["config"], output_dir=None) == dict(ckpt1["config"], output_dir=None, batch_size=8)
    assert list(slurm[1].particles) == list(single[1].particles)
    assert list(slurm[1].particles["rlnImageName"]) == list(single[1].particles["rlnImageName"])
    np.testing.assert_array_equal(slurm[2][0], single[2][0])
    # The result of the program's own 2-process training.
    torch.testing.assert_close(ckpt["model"], spawned[0]["model"])
    np.testing.assert_allclose(ckpt["history"], spawned[0]["history"], rtol=1e-6)
    columns = latent_columns(LATENT_DIM)
    np.testing.assert_allclose(np.stack([slurm[1].particles[c] for c in columns], 1),
                               np.stack([spawned[1].particles[c] for c in columns], 1), rtol=1e-5, atol=1e-6)

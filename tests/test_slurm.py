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
"""deepcryo protocols through a real SLURM queue (Scipion's "Use a queue engine", one job per step).

A one-node SLURM cluster (``tests/slurm_cluster.py``, 2 CPUs) and a SLURM ``hosts.conf`` (read by the
protocol runs through ``SCIPION_HOSTS``) take SwiftAlign (index step, then two query chunks) and the deep defocus
(two batches of micrographs), 3 Scipion threads so two steps run at a time. Each program must have run as its own
SLURM job (SLURM's job completion log), the two query / batch jobs side by side (their run times overlap), and the
outputs must equal those of the same protocol run locally. Skips with one line where SLURM cannot run (not root,
no apt-get).
"""
import datetime
import json
import os

import numpy as np
import pytest
from pwem.protocols import ProtImportMicrographs, ProtImportVolumes
from pyworkflow.tests import setupTestProject

from deepcryo.constants import OUTPUT_CTF, OUTPUT_PARTICLES
from deepcryo.core import simulate
from deepcryo.core.micrographs import simulate_micrograph
from deepcryo.core.mrc import write_mrc
from deepcryo.protocols import DeepCryoProtDeepDefocus, DeepCryoProtSwiftAlign, DeepCryoProtVaeTrain
from deepcryo.tests.harness import ProtocolTest
from deepcryo.tests.sets import importParticleSet, particleSetFromStar

from slurm_cluster import slurm  # noqa: F401  (fixture: the test cluster)

#: Scipion's SLURM host configuration (as in Scipion's documentation), with a queue that sends each step as a
#: job of JOB_CPUS CPUs (Scipion's JOB_THREADS counts the protocol's step threads, not a step's program threads).
SLURM_HOSTS_CONF = """[localhost]
PARALLEL_COMMAND = mpirun -np %_(JOB_NODES)d %_(COMMAND)s
NAME = SLURM
MANDATORY = 0
SUBMIT_COMMAND = sbatch %_(JOB_SCRIPT)s
CANCEL_COMMAND = scancel %_(JOB_ID)s
CHECK_COMMAND = squeue -h -j %_(JOB_ID)s
SUBMIT_TEMPLATE = #!/bin/bash
    #SBATCH --export=ALL
    #SBATCH -J %_(JOB_NAME)s
    #SBATCH -o %_(JOB_LOGS)s.out
    #SBATCH -e %_(JOB_LOGS)s.err
    #SBATCH -p %_(JOB_QUEUE)s
    #SBATCH --ntasks=1 --cpus-per-task=%_(JOB_CPUS)s --time=%_(JOB_TIME)s:00:00
    %_(JOB_COMMAND)s
QUEUES = {"@PARTITION@": [["JOB_TIME", "1", "Time (hours)", "Time limit of each job"],
                            ["JOB_CPUS", "1", "CPUs per job", "CPUs of each job (threads of its program)"],
                            ["QUEUE_FOR_JOBS", "Y", "Use queue for jobs", "Send each step as a job"]]}
"""

BOX, PX, N_PARTICLES = 48, 3.0, 80
MIC_BOX, MIC_PX, N_MICS = 512, 1.2, 4


class _Project(ProtocolTest):
    """The Scipion project of this module (its class methods create and launch the protocols)."""


@pytest.fixture(scope="module")
def project(slurm, tmp_path_factory):  # noqa: F811  (slurm: the fixture imported above)
    """The test project with particles, a map and micrographs; the protocol runs it launches read the SLURM
    ``hosts.conf`` (``SCIPION_HOSTS``, read by pyworkflow when each run starts)."""
    hosts = slurm.path("hosts.conf")
    with open(hosts, "w") as f:
        f.write(SLURM_HOSTS_CONF.replace("@PARTITION@", slurm.partition))
    previous = os.environ.get("SCIPION_HOSTS")
    os.environ["SCIPION_HOSTS"] = hosts
    try:
        setupTestProject(_Project)
        folder = os.path.abspath(_Project.proj.getPath("simulated"))
        vol = simulate.phantom_volume(BOX, seed=5)
        star = simulate.write_particle_set(folder, vol, N_PARTICLES, PX, snr=0.1, seed=6, max_shift_px=2.0,
                                           defocus_range_A=(15000.0, 20000.0))
        write_mrc(os.path.join(folder, "ref.mrc"), vol, PX)
        _Project.particles = importParticleSet(
            _Project, particleSetFromStar(star, os.path.join(folder, "raw.sqlite"), withAlignment=False), PX)
        _Project.volume = _Project.newProtocol(ProtImportVolumes, filesPath=folder, filesPattern="ref.mrc",
                                               samplingRate=PX)
        _Project.launchProtocol(_Project.volume)
        for i in range(N_MICS):
            img, _ = simulate_micrograph(MIC_BOX, pixel_size_A=MIC_PX, voltage_kV=300.0, cs_mm=2.7,
                                         amplitude_contrast=0.07, seed=300 + i, defocus_u_A=12000.0 + 3000 * i,
                                         defocus_v_A=11000.0 + 3000 * i, defocus_angle_deg=30.0)
            write_mrc(os.path.join(folder, "mic_%02d.mrc" % i), img, MIC_PX)
        _Project.mics = _Project.newProtocol(ProtImportMicrographs, filesPath=folder, filesPattern="mic_*.mrc",
                                             samplingRate=MIC_PX, voltage=300.0, sphericalAberration=2.7,
                                             amplitudeContrast=0.07)
        _Project.launchProtocol(_Project.mics)
        yield _Project
    finally:
        if previous is None:
            os.environ.pop("SCIPION_HOSTS", None)
        else:
            os.environ["SCIPION_HOSTS"] = previous


def _launch(project, prot, cluster=None):
    """Run ``prot`` with 3 Scipion threads (2 steps at a time), locally or, with ``cluster``, one SLURM job per
    step in its partition."""
    prot.numberOfThreads.set(3)
    if cluster is not None:
        prot._useQueue.set(True)
        prot._queueParams.set(json.dumps([cluster.partition, {"JOB_TIME": "1", "JOB_CPUS": "1",
                                                               "QUEUE_FOR_JOBS": "Y"}]))
    project.launchProtocol(prot)
    return prot


def _jobsOf(cluster, prot):
    """SLURM's finished jobs of the run ``prot``, by step: {step id: [job]} (Scipion names a step's jobs
    ``<run id>-<step id>-<n>``)."""
    steps = {}
    for job in cluster.finishedJobs():
        run, step, _ = job["Name"].rsplit("-", 2)
        if run == prot.strId():
            steps.setdefault(int(step), []).append(job)
    return steps


def _time(stamp):
    return datetime.datetime.fromisoformat(stamp)


def _assertSideBySide(jobs):
    """Every job ran while every other was running (SLURM times, to the second)."""
    starts, ends = [_time(j["StartTime"]) for j in jobs], [_time(j["EndTime"]) for j in jobs]
    assert max(starts) < min(ends), ["%s %s-%s" % (j["JobId"], j["StartTime"], j["EndTime"]) for j in jobs]


def _assertSeparateJobs(steps, count):
    """``count`` steps each ran one program as one completed job of its own."""
    assert len(steps) == count and all(len(jobs) == 1 for jobs in steps.values()), steps
    jobs = [jobs[0] for jobs in steps.values()]
    assert len({j["JobId"] for j in jobs}) == count
    assert all(j["JobState"] == "COMPLETED" for j in jobs), jobs
    return jobs


def _swiftAlign(project):
    prot = project.newProtocol(DeepCryoProtSwiftAlign, samplingMode=0, angularStep=15.0, maxResolution=15.0,
                               maxShift=2.0, indexType=1, particlesPerStep=N_PARTICLES // 2)
    prot.inputParticles.set(project.particles.outputParticles)
    prot.inputVolume.set(project.volume.outputVolume)
    return prot


def _matrices(prot):
    out = getattr(prot, OUTPUT_PARTICLES)
    return np.stack([p.getTransform().getMatrix() for p in out.iterItems(orderBy="id")])


def test_swiftalign_steps_are_slurm_jobs(project, slurm):  # noqa: F811
    queued = _launch(project, _swiftAlign(project), slurm)
    steps = _jobsOf(slurm, queued)
    _assertSeparateJobs(steps, 3)
    index, queries = (steps[s][0] for s in sorted(steps)[:1]), [steps[s][0] for s in sorted(steps)[1:]]
    index, = index
    assert all(_time(index["EndTime"]) <= _time(q["StartTime"]) for q in queries)  # the chunks wait for the index
    _assertSideBySide(queries)
    local = _launch(project, _swiftAlign(project))
    assert not _jobsOf(slurm, local)
    np.testing.assert_allclose(_matrices(queued), _matrices(local), atol=1e-4)


def _defocus(project):
    prot = project.newProtocol(DeepCryoProtDeepDefocus, streamingBatchSize=N_MICS // 2)
    prot.inputMicrographs.set(project.mics.outputMicrographs)
    return prot


def _defoci(prot):
    ctfs = getattr(prot, OUTPUT_CTF)
    return {os.path.basename(c.getMicrograph().getFileName()): (c.getDefocusU(), c.getDefocusV(), c.getDefocusAngle())
            for c in ctfs}


def test_defocus_batches_are_slurm_jobs(project, slurm):  # noqa: F811
    queued = _launch(project, _defocus(project), slurm)
    jobs = _assertSeparateJobs(_jobsOf(slurm, queued), 2)  # two batches of two micrographs
    _assertSideBySide(jobs)
    local = _launch(project, _defocus(project))
    queuedValues, localValues = _defoci(queued), _defoci(local)
    assert sorted(queuedValues) == ["mic_%02d.mrc" % i for i in range(N_MICS)]
    for name, values in localValues.items():
        np.testing.assert_allclose(queuedValues[name], values, rtol=1e-6, err_msg=name)


@pytest.mark.parametrize("cls, useGpu, gpus, queueParams, expected", [
    (DeepCryoProtSwiftAlign, False, "0", {"QUEUE_FOR_JOBS": "Y"}, 0),  # CPU steps ask for no GPU
    (DeepCryoProtSwiftAlign, True, "0 1", {"QUEUE_FOR_JOBS": "Y"}, 1),  # one per step job
    (DeepCryoProtSwiftAlign, True, "0 1", {"QUEUE_FOR_JOBS": "N"}, 2),  # the whole protocol as one job
    (DeepCryoProtVaeTrain, True, "0 1", {"QUEUE_FOR_JOBS": "Y"}, 2),  # its one training step uses them all
    (DeepCryoProtSwiftAlign, True, "0 1", {"QUEUE_FOR_JOBS": "Y", "GPU_COUNT": "3"}, "3"),  # the queue's form
])
def test_gpus_per_job(tmp_path, cls, useGpu, gpus, queueParams, expected):
    """GPU_COUNT of the submit template: the GPUs one job of this protocol needs (Scipion's own value is the
    length of the hidden GPU list, 1 even for a CPU run)."""
    from pwem import Domain
    from pyworkflow.protocol import HostConfig

    Domain.getProtocols()  # gives the protocol classes their plugin, whose name goes into the submit variables
    hosts = tmp_path / "hosts.conf"
    hosts.write_text(SLURM_HOSTS_CONF.replace("@PARTITION@", "gpu"))
    prot = cls()
    prot.setHostConfig(HostConfig.load(str(hosts))["localhost"])
    prot.useGpu.set(useGpu)
    prot.gpuList.set(gpus)
    prot._useQueue.set(True)
    prot._queueParams.set(json.dumps(["gpu", queueParams]))
    assert prot.getSubmitDict()["GPU_COUNT"] == expected

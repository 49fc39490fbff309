"""Wall and CPU time of the deep defocus protocol with 1 and 2 batch steps at a time (issue 18).

A Scipion project (private Scipion home) imports ``--n`` simulated micrographs (``--size``² px, known CTF)
once, then runs ``DeepCryoProtDeepDefocus`` on them in batches of ``--batch`` micrographs, first with 1 step at
a time (2 Scipion threads), then with 2 (3 Scipion threads); each batch program gets ``--bin-threads``
threads. Wall time: the protocol run (``launchProtocol(wait=True)``, start of its process to its end). CPU
time: user + system seconds of the run's process and every program it started (``RUSAGE_CHILDREN`` of this
process, which waits for the run). The machine is shared: the load average before and after is printed too.

Example::

    python benchmarks/parallel_steps.py --n 8 --size 2048 --batch 2
"""
import argparse
import os
import platform
import resource
import sys
import tempfile
import time

from deepcryo import scipion_env


def _childrenCpuSeconds():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run(project, prot):
    """Launch ``prot``, wait for it; its wall and CPU seconds and the finished run."""
    wall0, cpu0 = time.monotonic(), _childrenCpuSeconds()
    project.launchProtocol(prot, wait=True)
    wall, cpu = time.monotonic() - wall0, _childrenCpuSeconds() - cpu0
    prot = project.getProtocol(prot.getObjId())
    if not prot.isFinished():
        sys.exit("%s failed:\n%s" % (prot.getRunName(), "\n".join(prot.getLogsLastLines(30))))
    return wall, cpu, prot


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=8, help="micrographs")
    parser.add_argument("--size", type=int, default=2048, help="micrograph size (px)")
    parser.add_argument("--batch", type=int, default=2, help="micrographs per batch step")
    parser.add_argument("--bin-threads", type=int, default=1, help="threads of each batch program")
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="deepcryo-parallel-steps-")
    scipion_env.setup(os.path.join(root, "scipion"))
    from pwem.protocols import ProtImportMicrographs
    from pyworkflow.project import Manager

    from deepcryo.core import micrographs
    from deepcryo.protocols import DeepCryoProtDeepDefocus

    project = Manager().createProject("parallel_steps")
    os.chdir(project.getPath())
    micDir = os.path.join(root, "micrographs")
    micrographs.simulate_micrograph_set(args.n, micDir, size_px=args.size, seed=3, pixel_size_range_A=(1.0, 1.0),
                                        voltages_kV=(300.0,), defocus_range_A=(8000.0, 30000.0))
    imp = project.newProtocol(ProtImportMicrographs, filesPath=micDir, filesPattern="*.mrc", samplingRate=1.0,
                              voltage=300.0, sphericalAberration=2.7, amplitudeContrast=0.07)
    _run(project, imp)
    print("machine: %s, %d CPUs (os.cpu_count), Python %s; load average before: %s"
          % (platform.node(), os.cpu_count(), platform.python_version(),
             " ".join("%.2f" % x for x in os.getloadavg())))
    print("%d micrographs of %d², batches of %d (%d steps), %d thread(s) per program"
          % (args.n, args.size, args.batch, -(-args.n // args.batch), args.bin_threads))
    results = {}
    for steps in (1, 2):
        prot = project.newProtocol(DeepCryoProtDeepDefocus, streamingBatchSize=args.batch,
                                   numberOfThreads=steps + 1, binThreads=args.bin_threads,
                                   objLabel="defocus, %d step(s) at a time" % steps)
        prot.inputMicrographs.set(imp.outputMicrographs)
        wall, cpu, prot = _run(project, prot)
        results[steps] = wall
        print("%d step(s) at a time: wall %.1f s, CPU %.1f s (%d CTFs)" % (steps, wall, cpu, prot.outputCTF.getSize()))
    print("speed-up (wall, 1 -> 2 steps at a time): %.2fx; load average after: %s"
          % (results[1] / results[2], " ".join("%.2f" % x for x in os.getloadavg())))


if __name__ == "__main__":
    main()

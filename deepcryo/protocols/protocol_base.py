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
"""What every deepcryo protocol shares: launching a deepcryo program (Python, environment, GPUs, threads),
writing the input particles as a RELION STAR, and the checks of the GPU list.

``DeepCryoProtBase`` is a mixin placed before the Scipion protocol class (``ProtRefine3D``,
``ProtCTFMicrographs``, ...), so each protocol keeps its place in Scipion's tree and its form.
"""
import pyworkflow.protocol.params as params
from pyworkflow.constants import QUEUE_FOR_JOBS

from deepcryo import Plugin
from deepcryo.convert import writeSetOfParticles

INPUT_PARTICLES_STAR = "input_particles.star"


def addGpuParams(form, gpuLabel="GPU ID", gpuHelp=None, useGpuHelp=None):
    """The hidden "Use GPU?" (default no) and "GPU IDs" (default "0") parameters of a deepcryo protocol."""
    form.addHidden(params.USE_GPU, params.BooleanParam, default=False, label="Use GPU?", help=useGpuHelp)
    form.addHidden(params.GPU_LIST, params.StringParam, default="0", label=gpuLabel, help=gpuHelp)


#: The ``--device`` of a program run by a step that has a GPU: Scipion replaces ``%(GPU)s`` with the id of the
#: GPU it gave that step (ThreadStepExecutor: one GPU slot per concurrent step; QueueStepExecutor: renumbered from
#: 0, the queue being the one that picks the card). It is a device index, not a ``CUDA_VISIBLE_DEVICES`` value:
#: inside a SLURM job with ``--gres=gpu:1``, SLURM has already set ``CUDA_VISIBLE_DEVICES`` to the card it
#: allocated (its physical id where the cluster does not confine devices with cgroups), so ``cuda:0`` is that
#: card, while overwriting ``CUDA_VISIBLE_DEVICES=0`` would pick physical card 0, maybe another job's. On a
#: workstation the id is the one the user typed, counted like ``nvidia-smi`` within what is visible.
GPU_DEVICE = "cuda:%(GPU)s"


class DeepCryoProtBase:
    """Shared engine launch and input conversion of the deepcryo protocols."""

    def _insertEngineSteps(self, runStep):
        """Convert the input, run the program in ``runStep``, create the outputs; only the program step waits
        for a GPU, and only when the user asked for one."""
        self._insertFunctionStep(self.convertInputStep, needsGPU=False)
        self._insertFunctionStep(runStep, needsGPU=self.usesGpu())
        self._insertFunctionStep(self.createOutputStep, needsGPU=False)

    def _deviceArgs(self):
        """``--device`` of a one-device program run by a step: the step's GPU (:data:`GPU_DEVICE`), or the CPU."""
        return ["--device", GPU_DEVICE if self.usesGpu() else "cpu"]

    def _stepGpuDevices(self):
        """``cuda:N`` of every GPU Scipion gave the running step (for a program that spreads over several; the
        ids ``%(GPU)s`` would be replaced with, which is a space-separated list and so no device name)."""
        return ["cuda:%s" % g for g in self._stepsExecutor.getGpuList()] if self.usesGpu() else []

    def getSubmitDict(self):
        """Scipion's queue variables, with ``GPU_COUNT`` the GPUs one job needs (for ``--gres=gpu:%_(GPU_COUNT)s``)
        unless the queue's form sets it: none without "Use GPU"; one per step job where steps run side by side
        (each step's program uses one GPU); the whole list for a job running the whole protocol or its one GPU
        step. Scipion's own value is the length of the GPU list, even when the GPU is not used."""
        submit = super().getSubmitDict()
        _, queueParams = self.getQueueParams()
        if "GPU_COUNT" not in queueParams:
            perStep = self.modeParallel() and submit.get(QUEUE_FOR_JOBS) == "Y"
            submit["GPU_COUNT"] = 0 if not self.usesGpu() else 1 if perStep else len(self.getGpuList())
        return submit

    def _runProgram(self, engine, args, *words, **kwargs):
        """Run ``python -m deepcryo.<engine> [words] args``; ``args`` may hold numbers (written with ``str``);
        ``kwargs`` go to ``runJob``. The program's environment is ``Plugin.getEnviron()`` (Scipion's, without
        its PYTHONPATH when ``DEEPCRYO_PYTHON`` is another Python).

        With a GPU, Scipion %-formats the arguments to replace ``%(GPU)s``: any other ``%`` (a file name) is
        doubled so that it comes through as written."""
        kwargs.setdefault("env", Plugin.getEnviron())
        line = " ".join(str(a) for a in args)
        if self.usesGpu() and GPU_DEVICE in line:
            line = line.replace("%", "%%").replace("%%(GPU)s", "%(GPU)s")
        self.runJob(Plugin.getProgram(engine, *words), line, **kwargs)

    def _inputParticlesStar(self):
        return self._getExtraPath(INPUT_PARTICLES_STAR)

    def convertInputStep(self):
        """The input particles as a RELION 3.1 STAR (stacks converted to MRC in the extra folder)."""
        writeSetOfParticles(self.inputParticles.get(), self._inputParticlesStar(),
                            outputDir=self._getExtraPath(), alignType=self._inputAlignType())

    def _inputAlignType(self):
        """Alignment written with the particles; None: the set's own."""
        return None

    def _oneGpuErrors(self, what):
        """The program computes on one GPU: refuse a list of several."""
        if self.usesGpu() and len(self.getGpuList()) != 1:
            return ["%s runs on one GPU: give one GPU id (e.g. 0)." % what]
        return []

    def _gpuPerStepErrors(self):
        """Steps run side by side on one GPU each: refuse more GPUs than concurrent steps (Scipion would give a
        step several, and its program uses one)."""
        steps = max(1, self.numberOfThreads.get() - 1)
        if self.usesGpu() and len(self.getGpuList()) > steps:
            return ["Each step runs on one GPU and %d run at a time (Scipion threads - 1): give at most %d GPU "
                    "id(s), or more Scipion threads." % (steps, steps)]
        return []

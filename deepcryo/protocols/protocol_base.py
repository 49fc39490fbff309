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

from deepcryo import Plugin
from deepcryo.convert import writeSetOfParticles

INPUT_PARTICLES_STAR = "input_particles.star"


def addGpuParams(form, gpuLabel="GPU ID", gpuHelp=None, useGpuHelp=None):
    """The hidden "Use GPU?" (default no) and "GPU IDs" (default "0") parameters of a deepcryo protocol."""
    form.addHidden(params.USE_GPU, params.BooleanParam, default=False, label="Use GPU?", help=useGpuHelp)
    form.addHidden(params.GPU_LIST, params.StringParam, default="0", label=gpuLabel, help=gpuHelp)


class DeepCryoProtBase:
    """Shared engine launch and input conversion of the deepcryo protocols."""

    def _insertEngineSteps(self, runStep):
        """Convert the input (no GPU), run the program in ``runStep`` (GPU slot), create the outputs (no GPU)."""
        self._insertFunctionStep(self.convertInputStep, needsGPU=False)
        self._insertFunctionStep(runStep, needsGPU=True)
        self._insertFunctionStep(self.createOutputStep, needsGPU=False)

    def _gpus(self):
        """GPU ids chosen in the form, or None when the protocol runs on the CPU."""
        return self.getGpuList() if self.usesGpu() else None

    def _runProgram(self, engine, args, *words, **kwargs):
        """Run ``python -m deepcryo.<engine> [words] args`` with the chosen GPUs made visible; ``args`` may
        hold numbers (written with ``str``); ``kwargs`` go to ``runJob``. The program's environment is
        ``Plugin.getEnviron()`` (Scipion's, without its PYTHONPATH when ``DEEPCRYO_PYTHON`` is another Python)."""
        kwargs.setdefault("env", Plugin.getEnviron())
        self.runJob(Plugin.getProgram(engine, *words, gpus=self._gpus()), " ".join(str(a) for a in args),
                    **kwargs)

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

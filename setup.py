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
"""Packaging of scipion-em-deepcryo (``pip install -e .``; in Scipion: ``scipion3 installp -p <dir> --devel``).

Dependencies come from ``requirements.txt``. Extras: ``gpu`` (CUDA build of faiss; uninstall
``faiss-cpu`` first, both provide the ``faiss`` module) and ``test`` (pytest).
"""
import ast
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _read(*path):
    with open(os.path.join(HERE, *path), encoding="utf-8") as f:
        return f.read()


def _version():
    """``__version__`` of deepcryo/__init__.py, read without importing the package."""
    for node in ast.parse(_read("deepcryo", "__init__.py")).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__version__" for t in node.targets):
            return ast.literal_eval(node.value)
    raise RuntimeError("deepcryo/__init__.py defines no __version__")


def _requirements():
    return [line.strip() for line in _read("requirements.txt").splitlines()
            if line.strip() and not line.startswith("#")]


setup(
    name="scipion-em-deepcryo",
    version=_version(),
    description="Scipion plugin: deep-learning defocus estimation, fast alignment by vector compression, "
                "conformational landscapes and a tested cryo-EM core",
    long_description=_read("README.rst"),
    long_description_content_type="text/x-rst",
    author="the deepcryo developers",
    license="GPLv3",
    python_requires=">=3.8",
    packages=find_packages(),
    include_package_data=True,
    package_data={"deepcryo": ["protocols.conf", "*.png", "defocus/weights/*"]},
    install_requires=_requirements(),
    extras_require={"gpu": ["faiss-gpu-cu12"], "test": ["pytest"]},
    entry_points={"pyworkflow.plugin": ["deepcryo = deepcryo"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: GNU General Public License v3 (GPLv3)",
        "Topic :: Scientific/Engineering :: Bio-Informatics",
    ],
    keywords="scipion cryoem cryo-em single-particle-analysis ctf deep-learning scipion-3.0",
)

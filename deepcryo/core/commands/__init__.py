"""The commands of the two core programs, ``python -m deepcryo.core.reconstruct`` (one command) and
``python -m deepcryo.core.simulate particles|micrographs``: one module each (``add_args``, ``main``)."""

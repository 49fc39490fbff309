"""The commands of ``python -m deepcryo.defocus``: one module each (``add_args``, ``main``)."""

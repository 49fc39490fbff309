"""The commands of ``python -m deepcryo.landscape``: one module each (``add_args``, ``main``)."""

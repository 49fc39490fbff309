"""The commands of ``python -m deepcryo.swiftalign``: one module each (``add_args``, ``main``)."""

"""The command-line pattern shared by every deepcryo program.

Each program's ``main(argv)`` reports problems with the user's input (:class:`deepcryo.core.io.InputError`)
itself: one line ``error: <file>: <problem>`` on stderr and a non-zero status. :func:`run_main` adds the same
for the operating system's refusals (a full disk, a read-only or missing folder, no permission), which can
happen in any program at any write: one line naming the file, status 2, no traceback. Files are written
atomically (:func:`deepcryo.core.io.atomic_output`), so such a failure leaves the previous file (or none)
under the final name.

Usage, at the end of a program module::

    if __name__ == "__main__":
        sys.exit(run_main(main))
"""
import sys

from .io import InputError

__all__ = ["run_main", "error_line"]


def error_line(exc):
    """``error: <file>: <problem>`` for an InputError or an OSError (errno text and file name)."""
    if isinstance(exc, OSError) and exc.strerror:
        name = exc.filename if exc.filename is not None else ""
        return "error: %s%s" % ("%s: " % name if name else "", exc.strerror)
    return "error: %s" % (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def run_main(main, argv=None):
    """``main(argv)``, with InputError and OSError turned into one line on stderr and exit status 2."""
    try:
        return main(argv)
    except (InputError, OSError) as exc:
        print(error_line(exc), file=sys.stderr, flush=True)
        return 2

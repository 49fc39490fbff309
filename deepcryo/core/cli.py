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

Every program that computes with torch takes ``--device`` and reads it with :func:`parse_devices`, so that a
device nothing can honour (CUDA on a host without it, a GPU index beyond the host's GPUs) stops the program
at the start with one line, before any work.
"""
import sys

from .io import InputError

__all__ = ["run_main", "error_line", "parse_devices"]


def parse_devices(words):
    """Torch device names from ``--device`` words: ``cpu``, ``cuda`` (= ``cuda:0``) or ``cuda:N``, one per word
    or comma-separated (``cuda:0,cuda:1``).

    Returns the list of canonical names (``['cpu']``, ``['cuda:0', 'cuda:1']``). Raises InputError for an
    unknown name, CPU mixed with CUDA, a GPU named twice, CUDA where torch has none, or a GPU index beyond
    ``torch.cuda.device_count()`` (with ``CUDA_VISIBLE_DEVICES`` the visible GPUs count from 0).
    """
    import torch
    if isinstance(words, str):
        words = [words]
    names = [w.strip().lower() for word in words for w in word.split(",") if w.strip()]
    if not names:
        raise InputError("--device: no device given (cpu, cuda or cuda:N)")
    devices = []
    for name in names:
        if name == "cpu":
            devices.append(name)
        elif name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
            devices.append("cuda:%d" % int(name[5:] or 0))
        else:
            raise InputError("--device %s: not a device (cpu, cuda or cuda:N)" % name)
    gpus = [d for d in devices if d != "cpu"]
    if gpus and len(gpus) != len(devices):
        raise InputError("--device %s: give either cpu or CUDA devices, not both" % " ".join(names))
    if len(set(gpus)) != len(gpus):
        raise InputError("--device %s: a GPU is named twice" % " ".join(names))
    if gpus and not torch.cuda.is_available():
        raise InputError("--device %s: CUDA is not available here (torch %s%s)" % (
            " ".join(gpus), torch.__version__, ", built without CUDA" if torch.version.cuda is None
            else ", no GPU visible"))
    count = torch.cuda.device_count() if gpus else 0
    beyond = [d for d in gpus if int(d[5:]) >= count]
    if beyond:
        raise InputError("--device %s: only %d GPU(s) visible (cuda:0 to cuda:%d)"
                         % (" ".join(beyond), count, count - 1))
    return devices


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

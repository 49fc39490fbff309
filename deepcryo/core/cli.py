"""The command-line pattern shared by every deepcryo program.

Each program is a package of commands (as cryoDRGN's ``commands/``): one module per subcommand with a
docstring holding real example lines, ``add_args(parser)`` and ``main(args)``. A program's ``__main__`` only
hands its command modules to :func:`run_program`, which

* builds the parser (one subparser per command, its module docstring as the help text);
* configures logging once (:func:`configure_logging`): engine modules log with
  ``logging.getLogger(__name__)``; INFO lines go to stdout as plain text, warnings to stderr;
* reads the shared options a command added with :func:`add_device_argument` and :func:`add_threads_argument`:
  ``--device`` is checked (:func:`parse_devices`) before any input is read, ``--threads`` sets torch's (and
  faiss's) CPU threads;
* is the one place where the user's input errors (:class:`deepcryo.core.errors.InputError`) and the operating
  system's refusals (a full disk, a read-only or missing folder, no permission; ``OSError``) become one line
  ``error: <file>: <problem>`` on stderr and exit status 2, without a traceback. Files are written atomically
  (:func:`deepcryo.core.files.atomic_output`), so such a failure leaves the previous file (or none) under the
  final name.

A program with a single command (``python -m deepcryo.core.reconstruct``) passes one module instead of a
dict. The shared options have one syntax in every program: ``--device cpu``, ``--device cuda`` (= ``cuda:0``),
``--device cuda:0 cuda:1`` or ``--device cuda:0,cuda:1``; ``--threads N`` (0: the libraries' default);
``--continue`` resumes a run; ``--learning-rate`` is the optimiser's step size.
"""
import argparse
import logging
import sys

from .errors import InputError

__all__ = ["run_program", "build_parser", "configure_logging", "logging_configured", "add_device_argument",
           "add_threads_argument", "add_continue_argument", "parse_devices", "error_line", "run_main"]

_PACKAGE_LOGGER = "deepcryo"


# ------------------------------------------------------------------------------------------------ logging
class _CurrentStream(logging.StreamHandler):
    """A handler writing to whatever ``sys.stdout``/``sys.stderr`` is at the time of the record, so that a
    program run in-process (tests, the demo) writes where that process's streams point now."""

    def __init__(self, name, level_filter):
        super().__init__()
        self._name = name
        self.addFilter(level_filter)

    @property
    def stream(self):
        return getattr(sys, self._name)

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns it; the stream is looked up at each record
        pass


def configure_logging():
    """Log records of the ``deepcryo`` package: INFO as bare lines on stdout, WARNING and above as bare lines
    on stderr (format ``%(message)s``: the lines programs printed before they logged). Idempotent."""
    logger = logging.getLogger(_PACKAGE_LOGGER)
    if logging_configured():
        return
    logger.setLevel(logging.INFO)
    for name, keep in (("stdout", lambda r: r.levelno < logging.WARNING),
                       ("stderr", lambda r: r.levelno >= logging.WARNING)):
        handler = _CurrentStream(name, keep)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)


def logging_configured():
    """True once :func:`configure_logging` ran in this process (a child process asks before configuring)."""
    return any(isinstance(h, _CurrentStream) for h in logging.getLogger(_PACKAGE_LOGGER).handlers)


# ------------------------------------------------------------------------------------------ shared options
def add_device_argument(parser, several=False, help_extra=""):
    """``--device`` in the one syntax of every program. ``several``: the command spreads its work over all the
    devices given (``args.devices``); otherwise it runs on one and more than one is an input error. After
    :func:`run_program` checked it, ``args.device`` is the first canonical name and ``args.devices`` all."""
    parser.add_argument("--device", nargs="+", default=["cpu"], metavar="DEVICE",
                        help="cpu, cuda (= cuda:0) or cuda:N" + (
                            "; several (cuda:0 cuda:1 or cuda:0,cuda:1) share the work" if several else
                            " (one device)") + help_extra)
    parser.set_defaults(_several_devices=several)


def add_threads_argument(parser, default=0):
    """``--threads N``: CPU threads of torch (and faiss); 0 leaves the libraries' default."""
    parser.add_argument("--threads", type=int, default=default,
                        help="CPU threads of torch and faiss (0: the libraries' default; default %d)" % default)


def add_continue_argument(parser, what):
    """``--continue``: resume from ``what`` (``args.resume``)."""
    parser.add_argument("--continue", dest="resume", action="store_true", help="resume from " + what)


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


def _apply_shared_options(args, command):
    """Check ``--device`` and set ``--threads`` before the command reads anything."""
    if hasattr(args, "_several_devices"):
        devices = parse_devices(args.device)
        if not args._several_devices and len(devices) > 1:
            raise InputError("%s runs on one device, got --device %s" % (command, " ".join(devices)))
        args.device, args.devices = devices[0], devices
    if getattr(args, "threads", 0) > 0:
        import torch
        torch.set_num_threads(args.threads)
        faiss = sys.modules.get("faiss")  # loaded by the commands that search an index
        if faiss is not None:
            faiss.omp_set_num_threads(args.threads)


# ------------------------------------------------------------------------------------------------ programs
def _summary(module):
    return (module.__doc__ or "").strip().splitlines()[0]


def build_parser(prog, description, commands):
    """The parser of a program: ``commands`` is a dict ``name -> command module`` (one subparser each, the
    module's docstring its description) or a single command module (no subcommand)."""
    fmt = argparse.RawDescriptionHelpFormatter
    if not isinstance(commands, dict):
        parser = argparse.ArgumentParser(prog=prog, description=commands.__doc__, formatter_class=fmt)
        commands.add_args(parser)
        parser.set_defaults(_command=commands)
        return parser
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in commands.items():
        p = sub.add_parser(name, help=_summary(module), description=module.__doc__, formatter_class=fmt)
        module.add_args(p)
        p.set_defaults(_command=module)
    return parser


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


def run_program(prog, description, commands, argv=None):
    """Parse ``argv`` (default ``sys.argv[1:]``), configure logging and run the chosen command's ``main(args)``.

    Returns the exit status: 0, or 2 after one ``error:`` line on stderr for an InputError or OSError
    (argparse's own usage errors exit with status 2 as usual).
    """
    args = build_parser(prog, description, commands).parse_args(argv)
    configure_logging()
    name = getattr(args, "command", None) or prog.split(".")[-1]

    def run(_argv):
        _apply_shared_options(args, name)
        args._command.main(args)
        return 0

    return run_main(run)

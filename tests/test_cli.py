"""The one command-line pattern (:mod:`deepcryo.core.cli`): every program is built from command modules with
``add_args``/``main`` and a docstring with examples, takes the shared options in one syntax, logs its lines
to stdout (warnings to stderr) and turns an input error into one line and exit status 2."""
import importlib
import logging

import pytest
import torch

from deepcryo.core import cli
from deepcryo.core.errors import InputError

PROGRAMS = ["deepcryo.swiftalign", "deepcryo.defocus", "deepcryo.landscape", "deepcryo.core.reconstruct",
            "deepcryo.core.simulate"]


def _main(program):
    return importlib.import_module(program + (".__main__" if program.count(".") == 1 else "")).main


def _commands(program):
    """(name, parser) of each command of ``program`` (the program's own parser when it has no subcommand)."""
    module = importlib.import_module(program + (".__main__" if program.count(".") == 1 else ""))
    if program == "deepcryo.core.reconstruct":
        from deepcryo.core.commands import reconstruct
        commands = reconstruct
    elif program == "deepcryo.core.simulate":
        from deepcryo.core.commands import simulate_micrographs, simulate_particles
        commands = {"particles": simulate_particles, "micrographs": simulate_micrographs}
    else:
        commands = module.COMMANDS
    parser = cli.build_parser(program, module.__doc__, commands)
    if not isinstance(commands, dict):
        return [(program, parser, commands)]
    sub = next(a for a in parser._actions if a.dest == "command")
    return [(name, sub.choices[name], commands[name]) for name in commands]


@pytest.mark.parametrize("program", PROGRAMS)
def test_commands_share_one_syntax(program):
    """Each command documents itself with real example lines, and the shared options have one form: --device
    takes one or more words, --threads an int, a resume is --continue and a step size --learning-rate."""
    for name, parser, module in _commands(program):
        assert callable(module.add_args) and callable(module.main)
        assert "python -m %s" % program in module.__doc__, name
        flags = {s: a for a in parser._actions for s in a.option_strings}
        assert not {"--resume", "--lr", "--gpu", "--gpus", "-j", "--num-threads"} & set(flags), (name, flags)
        if "--device" in flags:
            assert flags["--device"].nargs == "+" and flags["--device"].default == ["cpu"], name
            assert "--threads" in flags, name
        if "--threads" in flags:
            assert flags["--threads"].type is int, name
        if "--continue" in flags:
            assert flags["--continue"].dest == "resume", name


def test_single_device_commands_refuse_several(monkeypatch, capsys):
    """Commands that run on one device say so in one line when given two (the same words a multi-device command
    takes), before reading any input."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for program, argv in [("deepcryo.defocus", ["predict", "--micrographs", "missing/*.mrc", "--output", "c.star"]),
                          ("deepcryo.defocus", ["train", "--simulate", "8", "--output", "m.pt"]),
                          ("deepcryo.core.reconstruct", ["--particles", "missing.star", "--output", "m.mrc"])]:
        assert _main(program)(argv + ["--device", "cuda:0", "cuda:1"]) == 2
        command = argv[0] if program == "deepcryo.defocus" else "reconstruct"
        assert capsys.readouterr().err == "error: %s runs on one device, got --device cuda:0 cuda:1\n" % command


def _command_module(lines, error=None):
    """A command module that logs ``lines`` (INFO and one WARNING) and then raises ``error``."""
    class Command:
        """Test command.

        Example::

            python -m test
        """

        @staticmethod
        def add_args(parser):
            cli.add_threads_argument(parser)

        @staticmethod
        def main(args):
            log = logging.getLogger("deepcryo.test_cli")
            for line in lines:
                log.info(line)
            log.warning("skipped something")
            if error is not None:
                raise error
    return Command


def test_run_program_logs_lines_and_maps_errors(capsys):
    """INFO lines on stdout as printed before, warnings on stderr, an InputError or OSError as one line and 2; the
    streams are looked up at each line, so a second in-process run writes where that run's streams point."""
    assert cli.run_program("test", None, _command_module(["a line", "another 5 Å"]), []) == 0
    out, err = capsys.readouterr()
    assert out == "a line\nanother 5 Å\n" and err == "skipped something\n"
    assert cli.run_program("test", None, _command_module([], InputError("bad.star: no particles")), []) == 2
    assert capsys.readouterr() == ("", "skipped something\nerror: bad.star: no particles\n")
    refused = OSError(28, "No space left on device", "/full/map.mrc")
    assert cli.run_program("test", None, _command_module([], refused), []) == 2
    assert capsys.readouterr().err.splitlines()[-1] == "error: /full/map.mrc: No space left on device"
    cli.configure_logging()  # idempotent: still one line per record
    cli.run_program("test", None, _command_module(["once"]), [])
    assert capsys.readouterr().out == "once\n"

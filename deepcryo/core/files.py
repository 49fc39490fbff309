"""Files that are either complete or absent: atomic writes, and the clean-up of killed writes.

Every file deepcryo writes goes through :func:`atomic_output`: it is written under a temporary name in the
same folder, then renamed with ``os.replace``, so a killed program never leaves a partial file under the
final name. A process killed without a chance to clean up (SIGKILL, power loss) leaves its temporary
``.<name>.<random>.part<.ext>`` behind; :func:`remove_stale_parts` and :func:`remove_stale_parts_in` delete
those when a run is resumed.
"""
import contextlib
import os
import re
import tempfile
from typing import Iterator, List, Pattern

from .errors import InputError

__all__ = ["atomic_output", "remove_stale_parts", "remove_stale_parts_in", "check_exists"]


@contextlib.contextmanager
def atomic_output(path: str) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``, on error delete it.

    The temporary lies in the same folder so that the rename is atomic (same file system); it gets the mode
    ``open()`` would have given the final file.
    """
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    base, ext = os.path.splitext(os.path.basename(path))
    fd, tmp = tempfile.mkstemp(prefix=".%s." % base, suffix=".part" + ext, dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp made it 0600; give it the mode open() would have
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def _umask() -> int:
    """The process umask (read without changing it where /proc allows; else set and restored at once)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _remove_matching(folder: str, pattern: Pattern) -> List[str]:
    removed = []
    for name in (os.listdir(folder) if os.path.isdir(folder) else []):
        if pattern.match(name):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(folder, name))
            removed.append(name)
    return removed


def remove_stale_parts(path: str) -> List[str]:
    """Delete the temporary files that :func:`atomic_output` of ``path`` left behind when its process was
    killed (SIGKILL, power loss) before it could clean up; returns their names. Call it when resuming."""
    path = os.path.abspath(path)
    base, ext = os.path.splitext(os.path.basename(path))
    return _remove_matching(os.path.dirname(path), re.compile(r"^\.%s\.[A-Za-z0-9_]+\.part%s$"
                                                              % (re.escape(base), re.escape(ext))))


def remove_stale_parts_in(folder: str) -> List[str]:
    """:func:`remove_stale_parts` for every file of ``folder`` (``.<name>.<random>.part[.<ext>]``, the names
    :func:`atomic_output` gives its temporaries); returns their names."""
    return _remove_matching(os.path.abspath(folder), re.compile(r"^\..+\.[A-Za-z0-9_]+\.part(\.[^.]+)?$"))


def check_exists(path: str, what: str = "file") -> None:
    """Raise InputError ``<path>: <what> not found`` when ``path`` does not exist."""
    if not os.path.exists(path):
        raise InputError("%s: %s not found" % (path, what))

"""The one error type for bad user input, and short reasons for the files torch refuses to load.

Every problem with the user's input (a missing or damaged file, a missing column, an impossible value)
raises :class:`InputError` with one line that names the file and the problem; the programs print that line
and exit with status 2 (:mod:`deepcryo.core.cli`), the protocols show it in their validation.
"""

__all__ = ["InputError", "load_error_reason"]


class InputError(Exception):
    """A problem with the user's input; the message is one line that names the file and the problem."""


def load_error_reason(exc: BaseException) -> str:
    """A short reason why ``torch.load(path, weights_only=True)`` refused a file (for one-line messages).

    torch explains a refusal in several lines of advice; the user needs to know only whether the file holds
    Python objects (refused because loading it could run code) or is not a weight file at all.
    """
    text = str(exc)
    if "Unsupported global" in text:
        return "it holds Python objects, not plain weights: refused, loading it could run code"
    if "Weights only load failed" in text or "PytorchStreamReader" in text or "invalid load key" in text \
            or "zip archive" in text or "magic number" in text:
        return "not a torch weight file, or a truncated one"
    return (text.strip().splitlines() or [type(exc).__name__])[0][:100]

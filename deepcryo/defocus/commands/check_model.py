"""Check that a file is a deepcryo defocus model, without running any code it holds.

Example::

    python -m deepcryo.defocus check-model --model my_model.pt   # exit 0, or 2 and one "error: ..." line

The file is read as :func:`deepcryo.defocus.model.load_model` reads it (``torch.load(weights_only=True)``)
and its weights are loaded into the architecture it names. The Scipion protocol's form validation runs this
program with ``DEEPCRYO_PYTHON``, so Scipion's own Python needs no torch.
"""


def add_args(parser):
    parser.add_argument("--model", required=True, help="model file (.pt) to check")


def main(args):
    from ..model import load_model
    load_model(args.model)

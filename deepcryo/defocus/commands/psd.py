"""PSD preview of one micrograph (MRC), the PSD the fit uses, over the micrograph's whole Nyquist.

Example::

    # a 256² preview of the PSD of one micrograph at 1.06 Å/px (what the band wizard of the Scipion form shows)
    python -m deepcryo.defocus psd --micrograph mic_001.mrc --pixel-size 1.06 --size 256 --output mic_001_psd.mrc

The output MRC holds :func:`deepcryo.defocus.psd.compute_psd` at the micrograph's own sampling (its pixel size
in the header): background subtracted, normalised, zero frequency at ``size // 2``. The Scipion form's wizard
runs this program with ``DEEPCRYO_PYTHON``, so Scipion's own Python needs no torch.
"""
from deepcryo.core.errors import InputError


def add_args(parser):
    parser.add_argument("--micrograph", required=True, help="MRC micrograph")
    parser.add_argument("--pixel-size", type=float, required=True, help="Å/px of the micrograph")
    parser.add_argument("--size", type=int, default=256, help="side of the preview, px (default 256)")
    parser.add_argument("--output", required=True, help="MRC to write")


def main(args):
    from deepcryo.core.mrc import read_mrc, write_mrc
    from ..psd import compute_psd
    if args.size < 16:
        raise InputError("--size must be >= 16 px")
    image, _ = read_mrc(args.micrograph)
    image = image.reshape(image.shape[-2:])
    psd = compute_psd(image, args.pixel_size, (args.pixel_size,), args.size)[0, 0].numpy()
    write_mrc(args.output, psd, args.pixel_size)

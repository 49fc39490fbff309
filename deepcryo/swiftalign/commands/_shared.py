"""Options every SwiftAlign command takes."""
import faiss  # noqa: F401  (loaded before the options are applied, so that --threads sets faiss's threads too)

from deepcryo.core import cli


def add_common_args(parser, several_devices):
    parser.add_argument("--particles", required=True, help="particle STAR (RELION 3.1 or 3.0) with CTF columns")
    cli.add_threads_argument(parser, default=2)
    parser.add_argument("--memory-limit", type=float, default=4.0,
                        help="memory bound for batches and index shards, GB")
    cli.add_device_argument(parser, several=several_devices,
                            help_extra="; the index is searched with faiss-gpu when it can be" if several_devices
                            else "")

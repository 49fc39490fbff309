"""Train the pose- and CTF-aware VAE (checkpoint per epoch, --continue resumes).

Example::

    python -m deepcryo.core.simulate particles --output-dir sim --states 2 --n 4000 --box 48 --snr 0.1
    python -m deepcryo.landscape train --particles sim/particles.star --output-dir vae --latent-dim 8 \\
        --epochs 10 --box 32
    python -m deepcryo.landscape train --particles sim/particles.star --output-dir vae --latent-dim 8 \\
        --epochs 20 --box 32 --continue
    python -m deepcryo.landscape train --particles P.star --output-dir vae --device cuda:0,cuda:1
    python -m deepcryo.landscape train --particles P.star --output-dir vae_pf --pose-free --reference map.mrc
    srun --ntasks-per-node=4 --gpus-per-node=4 python -m deepcryo.landscape train --particles P.star \
        --output-dir vae --device cuda
    torchrun --nproc-per-node=2 -m deepcryo.landscape train --particles P.star --output-dir vae --device cpu

The particles need consensus poses and CTF (RELION 3.1 STAR); with ``--pose-free`` (the seed's method, see
README "Pose-free mode" for its measured accuracy) only the CTF is read and a pose head learns the poses.
Several devices train with DistributedDataParallel, one process each. Started by ``srun`` (several SLURM
tasks, on one node or several) or ``torchrun``, every process is one rank of the same training: ``--device
cuda`` puts each on its own GPU (the GPU of its local rank, or the one GPU SLURM gave the task), ``--device cpu``
trains on CPUs (gloo); rank 0 writes the same files as a single process. The batch size is per process.
"""
from deepcryo.core import cli


def add_args(parser):
    add_training_args(parser)
    parser.add_argument("--pose-free", action="store_true",
                        help="ignore the particles' poses: learn them with a pose head (quaternion + shift)")
    parser.add_argument("--reference", default=None, help="pose-free: MRC map to start the mean volume from "
                                                          "(default: a soft sphere)")
    parser.add_argument("--pose-heads", type=int, default=8, help="pose-free: candidate poses per particle")


def add_training_args(parser):
    """The options of a training with given poses (shared with ``halves``)."""
    parser.add_argument("--particles", required=True, help="RELION 3.1 STAR with poses and CTF")
    parser.add_argument("--output-dir", required=True, help="output folder (checkpoint, consensus map, latents)")
    parser.add_argument("--latent-dim", type=int, default=8, help="latent dimension")
    parser.add_argument("--epochs", type=int, default=20, help="total epochs (also when continuing)")
    parser.add_argument("--box", type=int, default=None,
                        help="working box (px, even; Fourier crop); default: particle box")
    parser.add_argument("--batch-size", type=int, default=64, help="particles per step and device")
    parser.add_argument("--volume-steps", type=int, default=None,
                        help="steps per update of the decoder's volumes, their gradient summed over them (default: "
                             "(box/64)^2 rounded, at least 1, and up to 4 while an epoch keeps 64 updates)")
    parser.add_argument("--beta", type=float, default=1.0, help="weight of the KL term")
    parser.add_argument("--beta-warmup-epochs", type=float, default=None,
                        help="epochs over which the KL term's weight rises from 0 to --beta, step by step, so that "
                             "the latent is used before the KL term can collapse it (default: 0.25; 0: none)")
    parser.add_argument("--basis", type=int, default=16, help="basis volumes of the decoder")
    parser.add_argument("--learning-rate", type=float, default=3e-3,
                        help="Adam step size (3e-3 converges in 3-4 epochs on the simulated sets; 1e-3 needs more); "
                             "over the last quarter of the epochs it falls linearly to a tenth")
    cli.add_device_argument(parser, several=True, help_extra="; under srun or torchrun each process is one rank: "
                                                          "cpu, or cuda for the rank's own GPU")
    cli.add_threads_argument(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the batch order")
    cli.add_continue_argument(parser, "output-dir/checkpoint.pt")
    parser.add_argument("--symmetry", default="C1", help="point group of the particles, RELION's names (default "
                                                         "C1): every decoded volume has it")


def main(args):
    from ..train import train
    train(args.particles, args.output_dir, latent_dim=args.latent_dim, epochs=args.epochs, box=args.box,
          batch_size=args.batch_size, beta=args.beta, n_basis=args.basis, learning_rate=args.learning_rate,
          devices=args.devices, resume=args.resume, seed=args.seed, pose_free=args.pose_free,
          reference=args.reference, pose_heads=args.pose_heads, symmetry=args.symmetry,
          volume_steps=args.volume_steps, beta_warmup_epochs=args.beta_warmup_epochs)

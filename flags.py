"""flags.py: the command-line flags that the three trainers (estep.py, mstep.py, rlvr.py) share.

They mean the same in every trainer because model.py carries them out for all three: --resume and
--overwrite (finished_run, check_resumable, load_training), --fsdp (wrap_for_ranks), --cpu-bf16 (CPU_BF16),
--wandb (check_wandb, MetricsLog). They live here rather than in model.py because a trainer parses its
flags before it imports anything heavy, so that `--help` and a mistyped flag answer at once: model.py
imports torch and transformers (6 s on a 2-core CPU), this module imports nothing.
"""


def add_trainer_flags(parser, seed_help="seed"):
    """Add --resume, --overwrite, --fsdp, --seed, --cpu-bf16 and --wandb to a trainer's parser."""
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUT/checkpoint (a finished run is kept: extended to more --steps, else as is)")
    parser.add_argument("--overwrite", action="store_true", help="replace a finished run in OUT (else refused)")
    parser.add_argument("--fsdp", action="store_true", help="shard the model with FSDP2 instead of DDP")
    parser.add_argument("--seed", type=int, default=0, help=seed_help)
    parser.add_argument("--cpu-bf16", action="store_true", help="on CPU, compute in bf16 as on GPU (bf16 autocast and "
                        "bf16 copies for sampling and frozen models): 1.6-2x faster on CPUs with native bf16 "
                        "(AVX512-BF16, AMX), slower on others")
    parser.add_argument("--wandb", default=None, metavar="PROJECT", help="also log the metrics to this Weights & "
                        "Biases project (needs `pip install wandb`; WANDB_MODE=offline works without a network)")

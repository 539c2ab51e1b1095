"""`erasablemask describe --config FILE`: parameter counts of every network, for comparison with AttGAN."""

from erasablemask_jax.config import add_config_argument, config_from_args
from erasablemask_jax.models import parameter_counts


def register(subparsers) -> None:
  p = subparsers.add_parser("describe", help="print parameter counts of G, E_adv, R and D for a config")
  add_config_argument(p)
  p.set_defaults(func=run)


def run(args) -> int:
  config = config_from_args(args)
  counts = parameter_counts(config)
  width = max(map(len, counts))
  print(f"networks at {config.image_size}x{config.image_size}, {len(config.attributes)} attributes")
  for name, n in counts.items():
    print(f"  {name:<{width}}  {n:>13,d}")
  return 0

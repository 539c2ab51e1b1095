"""`erasablemask config --config FILE [--config.KEY=VALUE ...]`: print the resolved config."""

from erasablemask_jax.config import add_config_argument, config_from_args


def register(subparsers) -> None:
  p = subparsers.add_parser("config", help="print the resolved experiment config (after overrides)")
  add_config_argument(p)
  p.add_argument("--json", action="store_true", help="print JSON instead of YAML-like text")
  p.set_defaults(func=run)


def run(args) -> int:
  config = config_from_args(args)
  print(config.to_json_best_effort(indent=2) if args.json else config)
  return 0

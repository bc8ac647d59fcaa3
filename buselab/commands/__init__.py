"""Extra subcommands. Each module here has `register(subparsers)`; cli.py finds them."""

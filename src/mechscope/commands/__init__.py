"""One module per CLI command: HELP, add_arguments(parser), run(ctx) -> dict. No heavy imports at top level."""

"""CLI subcommands that are not owned by a subsystem (sample, export, train, eval, bench)."""

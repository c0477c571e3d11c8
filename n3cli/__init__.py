"""The `n3` command line: a Typer app with one small module per subcommand. It parses, resolves the preset, shows
progress and prints the report; the work happens in stages/."""

__version__ = "0.1.0"

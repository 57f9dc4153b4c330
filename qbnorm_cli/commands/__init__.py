"""One module per subcommand; each exports `command`, registered in qbnorm_cli.cli."""

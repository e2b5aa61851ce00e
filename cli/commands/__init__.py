"""The `kb` subcommands, one module per capability: each holds its `cmd_*` functions and a
`register(sub, common, ...)` that adds its subcommands to the top-level parser."""

"""The `flythinker` commands: each a typed function, its docstring the help."""

"""QMP: protocol core (sans-IO), schema, commands, jobs, HMP, transports and the in-process client."""

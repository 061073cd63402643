"""The core: the run directory, the stage protocol, durable files, config dataclasses and the
statistics. numpy / scipy / pandas only."""

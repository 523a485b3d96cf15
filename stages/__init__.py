"""Pipeline stages, installed as `hierdctl.stages`. One module per stage, each with `run(config)`."""

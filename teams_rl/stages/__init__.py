"""Pipeline stages; each module is one stage (see `teams_rl.pipeline` for the contract)."""

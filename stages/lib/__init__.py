"""The library floor: everything two stages share (models and the reward model, generation and held-out measurement,
the RL math, data formats, params, exit codes, tracking). Stages import only this package, never each other."""

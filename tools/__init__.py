"""Developer tooling for the embedded host: tiny checkpoints, server launcher, demo. Not loaded by ComfyUI."""

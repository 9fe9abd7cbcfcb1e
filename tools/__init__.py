"""What contributors run: tiny checkpoints, the demo, the dev server, the workflow builder, the node-interface
schema, packaging checks, test fixtures. Not loaded by ComfyUI and not shipped, except `batch_train.py`, the old
name of `python -m batch` kept for release 0.1 (docs/architecture.md)."""

"""What contributors run (tiny checkpoints, demo, dev server, workflow builder, packaging checks), and the host
boot (embedded_host.py) that the batch trainer uses too. Not loaded by ComfyUI; see docs/architecture.md."""

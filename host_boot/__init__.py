"""Boot a real ComfyUI from outside the pack: in this process or as a server, on the PyPI host or an upstream
checkout (COMFYUI_PATH). The batch trainer (`python -m batch`, a user command) starts its hosts with it, so it
ships; the tests, the demo, the benchmarks and the miniature world use it too. Not loaded by ComfyUI, and it
imports nothing of the pack (docs/architecture.md)."""

"""The batch trainer, a user command: one SeFi identity per person, headless (`python -m batch`, docs/batch.md).

cli.py reads the command line; people.py finds the people, checks their photos and prints the results; the
engines train them, http_engine.py on ComfyUI servers through the HTTP API (comfy_client.py), ray_engine.py on
Ray actors that boot the host in-process. host_base.py and node_inputs.py are what both engines share.
"""

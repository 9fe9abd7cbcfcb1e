"""The method's claims measured in the miniature world (issue 23): textual inversion vs SeFi-IDE vs each ablation,
trained on one studio photo of each held-out person and asked for new scenes, attributes and framings.

    python -m bench.world_claims --out .cache/world-claims            # the full design; resumable; writes the report
    python -m bench.world_claims --out DIR --report docs/results.md   # also (re)writes the docs' report

Modules: `plan` (variants, prompts, runs), `measure` (one run: train, render, read, attention overfit),
`report` (means with 95 % intervals, the tables and plots), `__main__` (the command).
"""

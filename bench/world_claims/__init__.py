"""The method's claims measured in the miniature world (issue 23): textual inversion vs SeFi-IDE vs each ablation,
trained on one studio photo of each held-out person and asked for new scenes, attributes and framings.

    python -m bench.world_claims                     # the full design into docs/results/runs/ (committed, resumable)
                                                     # and the report docs/results.md with its figures
    python -m bench.world_claims --hours 2           # start no new run after 2 h; the report covers what is done
    python -m bench.world_claims --out DIR           # a private cache and report (DIR/results.md)

Modules: `plan` (variants, prompts, runs), `measure` (one run: train, render, read, attention overfit),
`report` (means with 95 % intervals, the tables and plots), `__main__` (the command).
"""

"""A miniature world where SeFi-IDE can be seen to work (docs/world.md).

Pictures of people in scenes, drawn on an 8 × 8 grid of flat-coloured cells (64 × 64 px), each with a caption from a
closed vocabulary; identities carry traits that no word names. A small SD1.5-shaped checkpoint is trained on it here
from scratch, and a reader takes any generated picture back to the world's facts, so the method's claims can be
measured exactly. Pure numpy below `render`/`read`; the checkpoint modules use the host through host_boot.embedded_host.
"""

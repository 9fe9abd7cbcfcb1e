"""The third miniature world: named people, head yaw views, two people side by side (docs/world.md, "The third world").

The second world (world/render.py, captions.py, read.py, score.py; its weights world/weights/) stays what the pack
ships until this world's weights hold their gates; this package sits beside it and reuses its constructed text
encoder, VAE and U-Net shape (the U-Net's weights do not depend on the picture size). What is new here:
- a 10 × 10 grid (80 × 80 px, cells still 8 × 8 px, so the constructed VAE maps it to a 10 × 10 latent exactly);
- a roster of 200 named people (world/third/roster.py), each name one CLIP token of a real first name, whose
  wordless traits captions name only through the name;
- a richer wordless identity (skin tone, brow, nose and ear tints, a cheek mark): chance fidelity ≤ 25 %;
- five head views (front, three-quarter and profile to either side) named by view words;
- pictures of two people side by side, captions naming both ("emma and noah in a library").
"""

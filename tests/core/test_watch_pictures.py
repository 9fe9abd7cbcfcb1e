"""The pictures a training run shows: the live preview (loss curve + latest sample) and the attention-map picture."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sefi_core.attention_picture import face_maps, render_attention_picture, site_map
from sefi_core.plot import render_loss_curve
from sefi_core.watch_picture import CURVE_SIZE, preview_due, render_watch_picture


def test_preview_is_due_on_the_first_every_nth_and_last_step():
    assert [s for s in range(1, 26) if preview_due(s, 25, 10)] == [1, 10, 20, 25]
    assert not any(preview_due(s, 25, 0) for s in range(1, 26))


def test_preview_without_a_sample_is_the_titled_loss_curve():
    history = [1.0 / (i + 1) for i in range(40)]
    shares = [(1, 0.1), (25, 0.3), (40, 0.2)]
    pic = render_watch_picture(history, shares, 40, 600)
    assert pic.shape == (CURVE_SIZE[1], CURVE_SIZE[0], 3) and pic.dtype == np.uint8
    assert np.array_equal(pic, render_loss_curve(history, *CURVE_SIZE, title="step 40/600", shares=shares))


def test_preview_shows_the_sample_beside_the_curve_scaled_to_its_height():
    sample = np.zeros((64, 128, 3), np.float32)
    sample[:, 64:, 1] = 1.0  # left half black, right half green
    pic = render_watch_picture([0.5, 0.4], [], 2, 10, sample=sample, sample_step=2)
    h, w = CURVE_SIZE[1], CURVE_SIZE[0]
    assert pic.shape == (h, w + 2 * h, 3)
    right = pic[:, w:]
    assert (right[:, :h] == 0).all() and (right[:, h:, 1] == 255).all()


def test_site_map_averages_heads_and_the_identity_columns_on_the_grid():
    probs = torch.zeros(1, 2, 16, 5)
    probs[0, 0, 3, 2] = 1.0  # head 0, query 3 → column 2
    probs[0, 1, 3, 4] = 1.0  # head 1, query 3 → column 4 (not an identity column)
    m = site_map(probs, [2], (4, 4))
    assert m.shape == (4, 4) and float(m[0, 3]) == pytest.approx(0.5) and float(m.sum()) == pytest.approx(0.5)


def test_face_maps_average_the_sites_at_the_photo_size_and_the_picture_has_one_row_per_photo():
    g = torch.Generator().manual_seed(0)
    sites = [torch.rand(1, 2, 16, 3, generator=g), torch.rand(1, 2, 64, 3, generator=g)]
    refs = [torch.rand(1, 2, 16, 3, generator=g), torch.rand(1, 2, 64, 3, generator=g)]
    idm, refm = face_maps(sites, refs, [1], (8, 8), (8, 8))
    assert idm.shape == refm.shape == (8, 8)
    fine = site_map(sites[1], [1], (8, 8))  # the 8×8 site needs no resizing
    coarse = torch.nn.functional.interpolate(site_map(sites[0], [1], (8, 8))[None, None], size=(8, 8),
                                             mode="bilinear", align_corners=False)[0, 0]
    torch.testing.assert_close(idm, (fine + coarse) / 2)
    photos = torch.rand(2, 64, 64, 3, generator=g)
    pic = render_attention_picture(photos, [idm, idm], [refm, refm], cell=96)
    assert pic.dtype == np.uint8 and pic.shape[1] == 3 * 96 and pic.shape[0] == 2 * (96 + 14)
    with pytest.raises(ValueError, match="photo"):
        render_attention_picture(photos, [idm], [refm])

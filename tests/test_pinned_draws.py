"""Every method's default computation, pinned: a short fit of each at its defaults (same seed,
same simulations) must reproduce the draws stored in ``tests/data/pinned_draws.safetensors``.

A change that is meant to leave the methods' computation alone (a refactor, a new option that is
off by default) passes; one that moves a default fails here, and is then either a mistake or a
decision, taken by re-running the affected benchmark cells and writing the pins again
(``python tests/pinned_fits.py --write``). The tolerance admits float rounding only.
"""

import torch
from safetensors.torch import load_file

from pinned_fits import PINS, draws


def test_every_method_reproduces_its_pinned_draws():
    pinned = load_file(str(PINS))
    now = draws()
    assert sorted(now) == sorted(pinned)
    for name in sorted(pinned):
        torch.testing.assert_close(now[name], pinned[name], rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")

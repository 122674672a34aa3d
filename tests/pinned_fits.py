"""Small fixed fits of every method at its defaults, whose draws ``tests/data/pinned_draws.safetensors``
pins (``tests/test_pinned_draws.py``): a refactor that is meant to leave a method's computation
alone must reproduce them. Where a computation changes on purpose, write them again with

    python tests/pinned_fits.py --write

and commit the file together with the re-run benchmark cells that the change affects.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch

import implicitbayes as ib

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.models import hierarchical_model  # noqa: E402

PINS = Path(__file__).parent / "data" / "pinned_draws.safetensors"
X = torch.tensor([0.6, -0.4])


def simulator(theta):
    return theta + 0.5 * torch.randn_like(theta)


def model():
    theta = pyro.sample("theta", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    return pyro.sample("x", ib.Implicit(simulator, theta, event_shape=(2,)))


def draws() -> dict[str, torch.Tensor]:
    """Every method's draws after a short fit at its defaults (a few seconds in all)."""
    data = ib.simulate(model, 600, observed="x", seed=0, progress=False)
    fit = dict(seed=0, progress=False, max_steps=40)
    out = {}
    npe = ib.NPE(model, observed="x").fit(data, **fit)
    out["npe"] = npe.sample(200, X, seed=1)["theta"]
    out["npe.log_prob"] = npe.log_prob({"theta": out["npe"][:20]}, X)
    implicit = ib.ImplicitVI(model, observed="x").fit(data, **fit)
    out["implicit_vi"] = implicit.sample(200, X, seed=1)["theta"]
    out["implicit_vi.raw"] = implicit.sample(200, X, seed=1, correction=None)["theta"]
    out["implicit_vi.temperature"] = torch.tensor(float(implicit.config.temperature))
    nre = ib.NRE(model, observed="x").fit(data, **fit)
    out["nre.log_ratio"] = nre.log_ratio({"theta": out["npe"][:20]}, X)
    out["nre"] = nre.sample(40, X, seed=1, num_chains=1, warmup_steps=20)["theta"]
    abc = ib.ABC(model, observed="x", num_particles=100, num_simulations=3000, batch_size=1000).fit(
        observation=X, seed=0, progress=False)
    out["abc"] = abc.sample(200, seed=1)["theta"]
    x_groups = 0.3 + 0.1 * torch.arange(12.0).reshape(4, 3) / 12
    lfvi = ib.LFVI(hierarchical_model, observed="x", num_particles=8).fit(observation=x_groups, seed=0, progress=False,
                                                                   max_steps=20)
    lfvi_draws = lfvi.sample(100, seed=1)
    out["lfvi.mu"], out["lfvi.z"] = lfvi_draws["mu"], lfvi_draws["z"]
    return {k: v.detach().contiguous() for k, v in out.items()}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--write", action="store_true", help="overwrite the pinned draws with the current ones")
    args = ap.parse_args()
    now = draws()
    if args.write:
        from safetensors.torch import save_file

        PINS.parent.mkdir(exist_ok=True)
        save_file(now, str(PINS))
        print(f"wrote {PINS}")
    else:
        from safetensors.torch import load_file

        pinned = load_file(str(PINS))
        for k in sorted(pinned):
            diff = (now[k] - pinned[k]).abs().max().item() if k in now else math.nan
            print(f"{k:28s} max |now − pinned| = {diff:.3g}")

"""Real data: the Hudson Bay hare and lynx pelts 1900–1920, under the Lotka–Volterra ODE
(``hare_lynx``, with an exact reference) and under its stochastic version (``hare_lynx_sde``).

The ODE model is the one of the Stan case study on Lotka–Volterra (Carpenter 2018). Populations
of hare u and lynx v (thousands) follow

    du/dt = (α − β v) u,    dv/dt = (−γ + δ u) v,    (u, v)(1900) = (u₀, v₀),

and the pelts of year 1900 + t are log-normal around them, one scale per species:
log y_t,hare ~ Normal(log u(t), σ_hare), log y_t,lynx ~ Normal(log v(t), σ_lynx), t = 0, …, 20.
Priors: α, γ ~ Normal(1, 0.5) and β, δ ~ Normal(0.05, 0.05), each truncated to positive values;
u₀, v₀ ~ LogNormal(log 10, 1); σ_hare, σ_lynx ~ LogNormal(−1, 1). ``theta`` is the vector
(α, β, γ, δ, u₀, v₀, σ_hare, σ_lynx) (``parameter_names``), the observation the (21, 2) table,
hare first.

The ODE is solved in log-populations by classical fixed-step RK4, ``STEPS_PER_YEAR`` = 10 steps a
year, in float64 (relative error against 100 steps a year: 3·10⁻⁶ at the posterior mean); that solve is the model's definition, shared by the simulator and the
likelihood the reference posterior is drawn with. Parameters far in the prior's tails make
populations outgrow float32 (a hare population growing unchecked for twenty years): the
simulator returns ``inf`` there and ``ib.simulate`` reports and drops those rows.

``reference_samples(1)`` are draws of Pyro NUTS on :meth:`HareLynx.likelihood_model` (the same
model with the log-normal likelihood written out), made by ``benchmarks/hare_lynx_reference.py``
and shipped in ``data/hare_lynx_reference.csv.bz2``.

The stochastic model (``hare_lynx_sde``; Tran, Ranganath & Blei 2017 fit its kind, the chemical
Langevin equation of the four predator–prey reactions, by likelihood-free inference) has the ODE model's
parameters, priors and observation noise, and one more, κ; the populations follow

    du = (α u − β u v) dt + √(α u + β u v) dW₁,    dv = (δ u v − γ v) dt + √(δ u v + γ v) dW₂,

with the populations counted in units of 1/κ thousand animals for their noise: a reaction of
rate h moves a population by about √(h/κ) thousand a year (the W terms above are for κ = 1). κ is a
ninth parameter, log κ ~ Normal(log 100, 1.5); small κ is strong year-to-year variation with
frequent extinctions, and κ → ∞ is the ODE. Solved by Euler–Maruyama with step ``DT``
(:func:`simulators.lotka_volterra.lv_sde`; 0 is absorbing). Its likelihood is intractable, so it
has no reference posterior: it is the model a likelihood-free method is needed for, compared with
the ODE by predictive checks. Paths that pass ``MAX_POPULATION`` are returned as NaN, and
``ib.simulate`` reports and drops them.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints

from .base import Task, read_csv

__all__ = ["HareLynx", "HareLynxSDE", "HareLynxPrior", "DATA", "REFERENCE"]

DATA = Path(__file__).with_name("data") / "hare_lynx.csv"
REFERENCE = Path(__file__).with_name("data") / "hare_lynx_reference.csv.bz2"


class HareLynxPrior(dist.TorchDistribution):
    """The prior of (α, β, γ, δ, u₀, v₀, σ_hare, σ_lynx): four normals truncated to (0, ∞), then
    four log-normals; independent. ``extra``: further log-normal entries after them, as
    ``(log-scale location, log-scale sd)`` pairs (the stochastic model's κ)."""

    arg_constraints: dict = {}
    support = constraints.independent(constraints.positive, 1)
    has_rsample = True

    def __init__(self, extra: tuple[tuple[float, float], ...] = (), device=None, validate_args=None):
        kw = {"device": device, "dtype": torch.get_default_dtype()}  # device None: the default device
        extra = tuple(extra)
        self.extra = extra
        self.loc = torch.tensor([1.0, 0.05, 1.0, 0.05, math.log(10.0), math.log(10.0), -1.0, -1.0]
                                + [m for m, _ in extra], **kw)
        self.scale = torch.tensor([0.5, 0.05, 0.5, 0.05, 1.0, 1.0, 1.0, 1.0] + [s for _, s in extra], **kw)
        self.truncated = torch.tensor([True] * 4 + [False] * (4 + len(extra)), device=device)
        unit = dist.Normal(torch.zeros_like(self.loc), torch.ones_like(self.loc))
        # Φ at the lower bound 0 of the truncated ones (0 for the log-normals: no truncation)
        self.lower_cdf = torch.where(self.truncated, unit.cdf(-self.loc / self.scale), torch.zeros_like(self.loc))
        super().__init__(torch.Size(), torch.Size([8 + len(extra)]), validate_args=validate_args)

    def rsample(self, sample_shape=torch.Size()):
        shape = torch.Size(sample_shape) + self.event_shape
        u = torch.rand(shape, device=self.loc.device, dtype=self.loc.dtype)
        p = self.lower_cdf + u * (1 - self.lower_cdf)
        z = self.loc + self.scale * torch.special.ndtri(p.clamp(1e-12, 1 - 1e-12))
        return torch.where(self.truncated, z, z.exp()).clamp_min(torch.finfo(z.dtype).tiny)

    def log_prob(self, value):
        log_v = value.clamp_min(torch.finfo(value.dtype).tiny).log()
        point = torch.where(self.truncated, value, log_v)
        lp = dist.Normal(self.loc, self.scale).log_prob(point)
        lp = lp - torch.where(self.truncated, torch.log1p(-self.lower_cdf), log_v)
        lp = torch.where(value > 0, lp, torch.full_like(lp, -math.inf))
        return lp.sum(-1)


class _HudsonBay(Task):
    """The Hudson Bay hare–lynx series (21 years × 2 species), its parameters and priors; the
    subclasses give the population dynamics."""

    theta_dim, x_shape = 8, (21, 2)
    num_observations = 1
    parameter_names = ("alpha", "beta", "gamma", "delta", "u0", "v0", "sigma_hare", "sigma_lynx")
    series_names = ("hare (thousands of pelts)", "lynx (thousands of pelts)")
    record_times = tuple(range(1900, 1921))  # the years of the table's rows
    # `implicitbayes run hare_lynx_sde`: one data set, so the run is focused on it (ib.sequential)
    run_defaults = {"method": "implicit-vi", "simulations": 20_000, "rounds": 4, "num_samples": 10_000}

    @property
    def prior(self):
        return HareLynxPrior()

    def populations(self, theta: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The populations (u, v) at the 21 years for parameter rows ``(n, 8)``: ``(n, 21, 2)``."""
        raise NotImplementedError

    def _simulate(self, theta, g):
        with torch.no_grad():
            log_z = self.populations(theta, g).double().log()
        sigma = theta[:, 6:8].double()[:, None, :]
        eps = torch.randn(log_z.shape, generator=g, device=theta.device, dtype=torch.float64)
        return (log_z + sigma * eps).exp().to(theta.dtype)

    def observation(self, k: int) -> torch.Tensor:
        """The pelts table ``(21, 2)`` (thousands; rows 1900…1920, columns hare, lynx)."""
        self._check_k(k)
        rows = [line for line in DATA.read_text().splitlines() if line and not line.startswith("#")]
        table = np.loadtxt(rows[1:], delimiter=",", ndmin=2)  # rows[0]: the header year,hare,lynx
        return torch.as_tensor(table[:, 1:], dtype=torch.get_default_dtype())

    def true_parameters(self, k: int):
        """Real data: no true parameters; ``None``."""
        self._check_k(k)
        return None


class HareLynx(_HudsonBay):
    """The Hudson Bay hare–lynx series under the Lotka–Volterra ODE (the Stan case study's model)."""

    name = "hare_lynx"
    description = "real data: Hudson Bay hare and lynx pelts 1900–1920, Lotka–Volterra ODE, 8 parameters"
    STEPS_PER_YEAR = 10
    # `implicitbayes run hare_lynx`: sequential NLE (8 rounds of 2500 simulated at the current
    # posterior's draws; a MAF likelihood on the residual of the log-pelts' least-squares
    # regression on the parameters; the slice sampler along the posterior's principal axes) is
    # the closest of ours to the NUTS reference on every seed measured. The residual is kept in
    # every round: NLE's "auto" drops it where the residuals do not look Gaussian, which the
    # region's log-pelts miss by their excess kurtosis, and without it the learned likelihood is
    # further from the exact one (benchmarks/results/hare_lynx.md)
    run_defaults = {"method": "nle", "method_options": {"sampler": "slice", "flow": "maf", "linear_residual": True},
                    "simulations": 20_000, "rounds": 8, "num_samples": 10_000}

    def populations(self, theta: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Noise-free populations (u, v) in the 21 years: ``(n, 21, 2)``, float64, differentiable
        in ``theta``; ``inf`` where they outgrow float64.

        Classical RK4 in log-populations, ``STEPS_PER_YEAR`` steps a year, written out rather than
        through ``torchdiffeq.odeint`` so that ``torch.compile`` turns the reference sampler's
        gradient into one kernel (0.7 ms instead of 16 ms with odeint's graph breaks)."""
        th = theta.double()
        a, b, c, d = (th[:, i] for i in range(4))
        h = 1.0 / self.STEPS_PER_YEAR

        def rhs(lu, lv):
            return a - b * lv.exp(), -c + d * lu.exp()

        lu, lv = th[:, 4].log(), th[:, 5].log()
        out = [torch.stack([lu, lv], -1)]
        for _year in range(20):
            for _step in range(self.STEPS_PER_YEAR):
                k1 = rhs(lu, lv)
                k2 = rhs(lu + h / 2 * k1[0], lv + h / 2 * k1[1])
                k3 = rhs(lu + h / 2 * k2[0], lv + h / 2 * k2[1])
                k4 = rhs(lu + h * k3[0], lv + h * k3[1])
                lu = lu + h / 6 * (k1[0] + 2 * k2[0] + 2 * k3[0] + k4[0])
                lv = lv + h / 6 * (k1[1] + 2 * k2[1] + 2 * k3[1] + k4[1])
            out.append(torch.stack([lu, lv], -1))
        return torch.stack(out, 1).exp()

    def likelihood(self, theta: torch.Tensor) -> dist.TorchDistribution:
        """The exact likelihood of the table given parameters ``(*batch, 8)``: log-normal pelts
        around the populations, one scale per species; batch shape ``batch``, event ``(21, 2)``."""
        batch = theta.shape[:-1]
        z = self.populations(theta.reshape(-1, 8)).reshape(batch + (21, 2))
        return dist.LogNormal(z.log(), theta[..., None, 6:8].double()).to_event(2)

    def likelihood_model(self, x: torch.Tensor | None = None):
        """The same model with the log-normal likelihood written out (what NUTS samples for the
        reference): ``theta`` latent, ``x`` observed."""
        theta = pyro.sample("theta", self.prior)
        return pyro.sample("x", self.likelihood(theta), obs=None if x is None else x.double())

    def reference_samples(self, k: int) -> torch.Tensor | None:
        """NUTS draws on :meth:`likelihood_model` for the table: ``(10000, 8)``."""
        self._check_k(k)
        return read_csv(REFERENCE) if REFERENCE.exists() else None


class HareLynxSDE(_HudsonBay):
    """The Hudson Bay hare–lynx series under the stochastic Lotka–Volterra model (module docstring):
    the ODE model's eight parameters, priors and observation noise, and κ, the size of the
    demographic noise; no reference posterior."""

    name = "hare_lynx_sde"
    description = "real data: Hudson Bay hare and lynx pelts 1900–1920, stochastic Lotka–Volterra (CLE), 9 parameters"
    theta_dim = 9
    parameter_names = _HudsonBay.parameter_names + ("kappa",)
    KAPPA_PRIOR = (math.log(100.0), 1.5)  # log κ ~ Normal(log 100, 1.5): 95 % in (5, 1900)
    DT = 0.001  # Euler–Maruyama step (years): the mean path is within 0.6 % of the ODE for large κ
    MAX_POPULATION = 1e5  # thousands; a path above it is dropped (NaN)

    @property
    def prior(self):
        return HareLynxPrior(extra=(self.KAPPA_PRIOR,))

    def populations(self, theta: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One path of the populations (u, v) per parameter row, at the 21 years: ``(n, 21, 2)``;
        NaN for a path that passes ``MAX_POPULATION``."""
        from .lotka_volterra import lv_sde

        a, b, c, d, u0, v0, kappa = (theta[:, i] for i in (0, 1, 2, 3, 4, 5, 8))
        # In units of 1/κ thousand the populations are κu, κv, and the reactions' rates in those
        # units are those of lv_sde, whose X are the predators (lynx) and Y the prey (hare):
        # h1 = (δ/κ) X Y (X born), h2 = γ X (X dies), h3 = α Y (Y born), h4 = (β/κ) X Y (Y eaten)
        paths = lv_sde(torch.stack([d / kappa, c, a, b / kappa], 1), x0=torch.stack([v0, u0], 1) * kappa[:, None],
                       dt=self.DT, T=20.0, record_every=1.0, max_population=3e38, on_blowup="nan",
                       generator=generator)
        z = paths.flip(1).transpose(1, 2) / kappa[:, None, None]
        blown = ~(z <= self.MAX_POPULATION).all(2).all(1)
        return z.masked_fill(blown[:, None, None], math.nan)

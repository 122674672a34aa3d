r"""Sequential rounds focused on one observation: truncated-prior rounds (TSNPE; Deistler,
Goncalves & Macke 2022), and for the likelihood-based methods rounds at the posterior's draws.

Round 1 simulates from the prior p(θ). After round r the current posterior q_r(θ | x_o) defines a
region R_r holding all but a fraction ε of its mass (its highest-density region, or for an
implicit posterior the region its draws cover, below); round r + 1 simulates from the prior
truncated to it, p̃_r(θ) ∝ p(θ) 1_{R_r}(θ), and the method is trained on all rounds' simulations,
afresh (NPE) or warm-started from round r (``warm_start``, below).

Why no proposal correction is needed. The simulations of all rounds are draws of
θ ~ π(θ) = Σ_r w_r p̃_r(θ) = p(θ) Σ_r (w_r / P(R_r)) 1_{R_r}(θ), x ~ p(x | θ), so a method fitted to
them learns π(θ | x) ∝ p(x | θ) π(θ). Wherever the true posterior p(θ | x_o) has its mass —
inside every R_r, which is what each region is built to hold — the factor Σ_r (w_r / P(R_r)) 1_{R_r}
is one constant, so π(θ | x_o) = p(θ | x_o) there: the same posterior at x_o, learned from
simulations that all land near it. (It is not amortized any more: at other observations the
answer is biased by the truncation.) The prior restricted to a region is proportional to the prior
there, which is what makes the rounds exact; a region that cuts posterior mass off biases the
result by at most that mass, hence ε = 10⁻⁴.

Regions. For NPE, the flow's own density: R = {θ : log q(θ | x_o) ≥ τ}, τ the ε-quantile of
log q over 20 000 of its draws (in the unconstrained coordinates the flow lives in). For NLE and
NRE, the unnormalised posterior log p(θ) + log q(x_o | θ) (NLE) or log p(θ) + r(θ, x_o) (NRE)
with τ its minimum over 2 000 MCMC draws — vectorized slice sampling from 20 chains started at
draws resampled in proportion to the learned likelihood, whatever sampler the posterior itself
uses: a region must hold every mode, and it is drawn each round, where Pyro's NUTS (one chain
after another) took minutes to tens of minutes on slcp. ImplicitVI has no density; its region is built from
what it has, its (critic-corrected) draws. A density g (a small MAF, :class:`DrawDensity`) is
fitted by maximum likelihood to ``FIT_DRAWS`` draws of q in standardised unconstrained
coordinates s, and R = {θ : log g(s(θ)) ≥ τ}, τ the ε-quantile of log g over ``DENSITY_DRAWS``
further draws of q, independent of the fit. Whatever g is, a fresh draw of q falls in R with
probability ≥ 1 − ε (up to the quantile's sampling error, as for NPE's own region): the draws
that set τ are q's, so R holds q's mass as the HPD region does, and the argument above applies
unchanged — nothing in it needs q's density, only that R holds the posterior's mass. g only
shapes the region: the closer it is to q, the smaller the R that holds 1 − ε of q, and where g
is poor R grows, it does not cut q. (A union of balls around the draws, the radius set so that
as many further draws fall in it, held the mass too but kept 92–99 % of slcp's prior in every
round: one radius for every ball is set by the draws furthest out; the fitted density's
regions keep 36–85 % there, and C2ST fell from 0.897 to 0.852 on its development cells,
``benchmarks/results/implicit_vi_ablation.md``.)

Posterior proposals (SNLE, Papamakarios et al. 2019; SNRE, Hermans et al. 2020). NLE learns
q(x | η(θ)), a conditional density of x given θ, and NRE the ratio p(x | θ) / p̃(x): neither
depends on where the simulated θ were drawn (only on where they reach), so their rounds may
simulate at draws of the current posterior itself, with no region and no correction —
``proposal="posterior"``, the default ("auto") for NLE and NRE. This puts every later simulation
where the posterior is, rather than anywhere in a region sized to hold all but 10⁻⁴ of its mass
(on slcp those regions keep 6–16 % of the prior), which is why SNLE reaches what truncated
rounds do not. A round simulates at ``POOL_FACTOR`` × its budget draws of the posterior
(vectorized slice sampling, as for the regions), picked with replacement
(:class:`PosteriorProposal`, a Pyro model like the truncated prior). From the third round on,
the pool resumes from the previous one (resample-move): its draws, weighted by the ratio of the
new unnormalised posterior to the old at each, start the chains, which warm up for a quarter of
the usual sweeps along the axes the last run found — where the weights keep at least
``RESUME_MIN_ESS`` of the draws effective, else the pool starts cold. NPE and ImplicitVI learn the
posterior itself, which a proposal other than the prior (restricted) would bias: they always run
truncated.

Warm or fresh fits (``warm_start``). A warm-started round keeps the previous round's weights and
standardisations, fitted to round 1's simulations from the whole prior; a fresh fit
(``warm_start=False``) refits both to all rounds so far, most of which sit in the region. For the
methods that learn the posterior itself, NPE and ImplicitVI, the fresh fit is the default
(``"auto"``). NPE: on the held-out cells (10⁴ simulations in 5 rounds,
``benchmarks/results/sequential.md``) it is lower than the warm start on slcp in each of three
seeds (mean C2ST 0.832 against 0.891) and, on the one seed measured, on sir (0.537 against
0.568), bernoulli_glm (0.561 against 0.593) and lotka_volterra_ode (0.690 against 0.770), level
on two_moons (observation 6: 0.546 against 0.541), at 1.1–1.6× the training time on slcp.
ImplicitVI: on slcp's development cells it is lower or level (``benchmarks/results/implicit_vi_ablation.md``).

A fresh fit in a posterior-proposal round (NLE, NRE) trains on the simulations whose parameters
lie in the region of the posterior that proposed the round — its unnormalised log posterior at
least its least value over the pool's draws, the region its truncated rounds would use — and
leaves the others out. The learned likelihood (or likelihood ratio) does not depend on where θ was
drawn, so choosing simulations by θ alone (never by x) leaves its target unchanged where the
posterior is; what changes is what the fit is fitted to: its standardisations and its linear
residual (``linear_residual="auto"``, kept where the residuals look Gaussian) come from
simulations near the posterior instead of round 1's prior draws, which sit hundreds of local sds
away and make the residuals anything but Gaussian. On the hare–lynx series (20 000 simulations in
8 rounds, ``benchmarks/results/hare_lynx.md``) the learned log-likelihood over the reference
posterior moves from 0.86 nats off the exact one to 0.60, and the worst posterior mean from 0.43
reference sd off to 0.28 (seed 0). NLE fits afresh by default (``"auto"``); NRE warm-starts, as
its rows were measured.

The truncated prior is a Pyro model (:class:`TruncatedPrior`) that ``ib.simulate`` runs like any
other — chunked, seeded, on executors, into a store: inside each chunk it draws candidates from
the model's own prior and keeps those in the region (rejection), then runs the model with the
latents fixed to them.

Small regions: rejection from an envelope. Rejection from the prior keeps a fraction P(R) of its
candidates, and each candidate costs a test of the region (for NPE a pass of the flow): a
narrow posterior (lotka_volterra_ode: 0.18 % of the prior after one round of 2 000 simulations)
makes a round cost a million flow passes, and each round shrinks it (10⁻⁵ of the prior by the
fourth). Where it keeps more, candidates come instead from an envelope g (:class:`Envelope`), a
density in the unconstrained coordinates u: a Student-t fitted to the posterior's draws u_j
(those that set the region), or for NPE the flow itself with its base widened (its draws follow
the flow's own long, curved tails, which no ellipse covers). With p(u) the prior's density there
(both normalised), M = 2 max p/g over the draws u_j and over draws of g that fall in the region,
and g the candidate (t or flow, widened 1.5, 2 or 3 times) with the least M, a candidate u ~ g
is kept with probability p(u) / (M g(u)) if it lies in R and p(u)/g(u) ≤ M. That is exact
rejection sampling of the prior truncated to R' = R ∩ {p/g ≤ M}: on R' the kept draws have
density g · p/(M g) ∝ p. R' is the region the round uses (its test, its prior mass); it holds
every posterior draw that set M, so it holds the posterior's mass as R does, and only points of R
far out in g's tails (where p/g is larger still) are left out. The candidates kept per candidate
drawn are P(R')/M, against P(R) from the prior — set by the region's shape, not by how small it
gets (lotka_volterra_ode, observation 6: 0.57 % against 0.20 % in the second round, 0.29 %
against 0.0045 % in the fourth) — and only candidates that pass the ratio test cost a test of
the region. The envelope is used where M < 1 (it keeps more); its prior mass is then estimated
by importance sampling, E_g[p/g · 1_R'], which resolves regions far below one in the 20 000
draws that estimate it.

A ``store`` makes the whole sequence resumable after ``kill -9``: each
round's simulations are a simulation store, each fit a checkpoint, each finished round's posterior
a file, so a rerun continues where it stopped and gives the same result.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import pyro
import pyro.poutine.runtime as pyro_runtime
import torch

from ..checks import choice, flag, flag_or_auto, integer, number
from ..errors import StoreMismatchError
from ..io import atomic_write_text
from ..nn import build_flow, draw, short_softmax, widened
from ..seeding import resolve_seed, seeded
from ..simulate import _OUTER_PLATE, device_context, model_sites, plate_layout, sharing_trial_runs, simulate
from .data import observed_values
from .mcmc import PriorDraws, SliceResume, batched_log_joint, without_observed
from .posterior import Posterior, load
from .training import TrainConfig, train

__all__ = ["sequential", "TruncatedPrior", "PosteriorProposal", "Region", "Envelope", "StudentT", "WidenedFlow",
           "DrawDensity", "region_of", "PriorDraws"]

QUANTILE = 1e-4  # posterior mass a region may leave out (TSNPE's ε)
DENSITY_DRAWS = 20_000  # draws of a flow posterior that set its region's threshold
MCMC_DRAWS = 2_000  # slice-sampling draws of an NLE / NRE posterior that set its region's threshold
FIT_DRAWS = 16_000  # ImplicitVI: draws its region's density is fitted to (DENSITY_DRAWS more set the threshold)
MASS_DRAWS = 20_000  # prior draws that estimate a region's prior mass
POOL_FACTOR = 2  # posterior proposal: MCMC draws per simulation of the round, drawn from with replacement
RESUME_MIN_ESS = 0.1  # a pool resumes from the previous one where its weights keep this fraction effective
PROPOSALS = ("auto", "truncated", "posterior")


class _Fixed(pyro.poutine.messenger.Messenger):
    """Latent sites take given values (not conditioned: they stay latent sites of the trace)."""

    def __init__(self, values: Mapping[str, torch.Tensor]):
        super().__init__()
        self.values = values

    def _pyro_sample(self, msg):
        if msg["name"] in self.values and not msg["is_observed"]:
            msg["value"] = self.values[msg["name"]]


class StudentT:
    """A multivariate Student-t (``DF`` degrees of freedom) in the unconstrained coordinates u:
    ``sample(m) -> (m, d)`` (global RNG) and ``log_prob(u) -> (m,)``, on the CPU in float64."""

    DF = 5.0

    def __init__(self, loc: torch.Tensor, scale_tril: torch.Tensor):
        self.loc, self.scale_tril = loc, scale_tril

    @classmethod
    def of(cls, u: torch.Tensor, scale: float) -> "StudentT":
        """Located at the mean of ``u (m, d)``, shaped by ``scale`` × its covariance."""
        u = u.double()
        cov = torch.cov(u.T).reshape(u.shape[1], u.shape[1])
        cov = cov + 1e-9 * cov.diagonal().mean() * torch.eye(u.shape[1], dtype=u.dtype)
        return cls(u.mean(0), math.sqrt(scale) * torch.linalg.cholesky(cov))

    def sample(self, m: int) -> torch.Tensor:
        z = torch.randn(m, len(self.loc), dtype=self.loc.dtype)
        w = torch.distributions.Chi2(torch.tensor(self.DF, dtype=self.loc.dtype)).sample((m,)) / self.DF
        return self.loc + (z @ self.scale_tril.T) / w.sqrt()[:, None]

    def log_prob(self, u: torch.Tensor) -> torch.Tensor:
        d, df = len(self.loc), self.DF
        z = torch.linalg.solve_triangular(self.scale_tril, (u.double() - self.loc).T, upper=False).T
        return (math.lgamma((df + d) / 2) - math.lgamma(df / 2) - d / 2 * math.log(df * math.pi)
                - self.scale_tril.diagonal().log().sum() - (df + d) / 2 * torch.log1p((z * z).sum(1) / df))


class WidenedFlow:
    """An NPE posterior's flow at one observation with its base's spread × ``scale``
    (:func:`~implicitbayes.nn.widened`), as a density in the unconstrained coordinates u:
    ``sample(m) -> (m, d)`` and ``log_prob(u) -> (m,)``, on the CPU in float64 (the flow runs on
    the posterior's device, seeded from the global CPU RNG)."""

    def __init__(self, posterior, x: torch.Tensor, scale: float):
        self.posterior = posterior
        self.g = widened(posterior.distribution(x), scale)
        self.log_scale = posterior.theta_standardize.scale.log().sum()

    def sample(self, m: int) -> torch.Tensor:
        device = self.posterior.device
        with seeded(int(torch.randint(2 ** 62, ())), device), device_context(device), short_softmax():
            u_s = draw(self.g, (m,))[:, 0]
        return self.posterior.theta_standardize.inverse(u_s).cpu().double()

    def log_prob(self, u: torch.Tensor) -> torch.Tensor:
        device = self.posterior.device
        u_s = self.posterior.theta_standardize(u.to(device, torch.get_default_dtype()))
        with device_context(device):
            return torch.cat([self.g.log_prob(u_s[i]) for i in torch.arange(len(u_s)).split(4096)]).cpu().double() \
                - float(self.log_scale)


class Envelope:
    r"""A proposal g for the prior truncated to a region — a density in the latents' unconstrained
    coordinates u (:class:`StudentT`, :class:`WidenedFlow`) — and a bound log M on
    log p(u) − log g(u), p the prior's density in u (both normalised): where the region is too
    small to hit from the prior, its truncated prior is drawn by rejection from g (module
    docstring). ``fit`` picks among candidate proposals the one with the least bound, M being
    ``MARGIN`` × the largest ratio p/g over the posterior's draws and over draws of g that fall in
    the region."""

    MARGIN = 2.0
    SCALES = (1.5, 2.0, 3.0)  # widening of the posterior's draws (t: of their covariance; flow: of its base)
    PROBES = 20_000  # draws of each candidate g that probe the ratio inside the region

    def __init__(self, space, prior_log_density: Callable[[Mapping[str, torch.Tensor]], torch.Tensor], proposal,
                 log_bound: float = math.inf):
        self.space, self.prior_log_density, self.proposal = space, prior_log_density, proposal
        self.log_bound = float(log_bound)

    @classmethod
    def fit(cls, draws: Mapping[str, torch.Tensor], space, prior_log_density, proposals,
            test: Callable[[Mapping[str, torch.Tensor]], torch.Tensor] | None = None) -> "Envelope":
        """The envelope among ``proposals`` with the least bound, over ``draws`` (``{site: (m,
        *shape)}`` of the posterior, on the CPU) and, with the region's ``test``, ``PROBES`` draws
        of each proposal that pass it."""
        best = None
        for proposal in proposals:
            g = cls(space, prior_log_density, proposal, 0.0)
            log_ratio = g.log_ratio(draws)
            if test is not None:
                probes = space.to_constrained(proposal.sample(cls.PROBES).to(torch.get_default_dtype()))
                inside = test(probes)
                log_ratio = torch.cat([log_ratio, g.log_ratio({k: v[inside] for k, v in probes.items()})])
            g.log_bound = float(log_ratio[torch.isfinite(log_ratio)].max()) + math.log(cls.MARGIN)
            if best is None or g.log_bound < best.log_bound:
                best = g
        return best

    def log_ratio(self, latents: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """log p(u) − log g(u) − log M at ``latents`` (≤ 0 inside the envelope's reach): ``(m,)``."""
        u = self.space.to_unconstrained(latents).double()
        log_p = self.prior_log_density(latents).double() + self.space.log_abs_det_jacobian(u).double()
        return log_p - self.proposal.log_prob(u) - self.log_bound

    def sample(self, m: int) -> dict[str, torch.Tensor]:
        """``m`` draws of g, as latents (global RNG)."""
        return self.space.to_constrained(self.proposal.sample(m).to(torch.get_default_dtype()))


class Region:
    """A set of latent values: ``contains(latents {site: (m, *shape)}) -> bool (m,)``, with a
    description (``kind``, ``threshold``) and its prior mass, estimated when it is made.
    ``device``: where the test runs (the posterior's; the model too, if the test runs it); the
    latents come from wherever the prior is drawn (the simulations' device) and the answer goes
    back there. With an ``envelope`` (:class:`Envelope`) the region is the test's set intersected
    with the envelope's reach {log p − log g ≤ log M}, drawn from by rejection from g."""

    def __init__(self, contains: Callable[[Mapping[str, torch.Tensor]], torch.Tensor], kind: str, threshold: float,
                 device: torch.device | None = None):
        self._contains, self.kind, self.threshold = contains, kind, float(threshold)
        self.device = None if device is None else torch.device(device)
        self.prior_mass: float | None = None
        self.envelope: Envelope | None = None

    def passes_test(self, latents: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The region's own test, without the envelope's reach: ``(m,)`` bool."""
        where = next(iter(latents.values())).device
        if self.device is None or self.device == where:
            return self._contains(latents)
        with device_context(self.device):
            return self._contains({k: v.to(self.device) for k, v in latents.items()}).to(where)

    def contains(self, latents: Mapping[str, torch.Tensor]) -> torch.Tensor:
        inside = self.passes_test(latents)
        if self.envelope is not None:
            inside = inside & (self.envelope.log_ratio({k: v.cpu() for k, v in latents.items()}) <= 0).to(inside.device)
        return inside

    @property
    def acceptance(self) -> float:
        """The expected fraction of candidates kept by the truncated prior's rejection step:
        the prior mass, or with an envelope the prior mass over M."""
        if self.prior_mass is None:
            raise RuntimeError("the region's prior mass has not been estimated")
        return self.prior_mass * (1.0 if self.envelope is None else math.exp(-self.envelope.log_bound))

    def estimate_mass(self, prior: PriorDraws, draws: int = MASS_DRAWS) -> float:
        """The region's prior mass: the fraction of ``draws`` prior draws inside it, or with an
        envelope the importance-sampling estimate E_g[p/g · 1_region] from as many draws of g
        (exact in expectation, and it resolves regions far smaller than 1 / ``draws``)."""
        total = 0.0
        for m in [8192] * (draws // 8192) + ([draws % 8192] if draws % 8192 else []):
            with torch.no_grad():
                if self.envelope is None:
                    total += float(self.contains(prior(m)).sum())
                else:
                    candidates = self.envelope.sample(m)
                    log_ratio = self.envelope.log_ratio(candidates)
                    inside = self.passes_test(candidates) & (log_ratio <= 0)
                    total += float((log_ratio + self.envelope.log_bound).exp()[inside].sum())
        if total == 0:
            source = "prior draws" if self.envelope is None else "draws of its envelope"
            raise ValueError(f"the posterior's region ({self.kind}) has numerically zero prior mass: none of {draws} "
                             f"{source} lies in it. The observation may be far outside what the model simulates "
                             "(check it with a prior predictive), or the posterior failed to train")
        self.prior_mass = total / draws
        return self.prior_mass


class _GivenLatents:
    """The model with its latents drawn by ``self.draw(n)`` instead of from its prior — a Pyro
    model ``ib.simulate`` runs like the original (``self.prior`` is the model's PriorDraws). Its
    sites are the model's, so its trial run is the model's (``trial_model``, read by
    :func:`~implicitbayes.simulate.trial_trace`): a round costs no extra simulator call for shapes."""

    model: Callable
    prior: PriorDraws

    @property
    def trial_model(self) -> Callable:
        return self.model

    def draw(self, n: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def __call__(self, *args, **kwargs):
        frames = [f for f in pyro_runtime.get_plates() if f.name == _OUTER_PLATE]
        n = frames[0].size if frames else 1
        values = self.draw(n)
        info = self.prior.info
        laid = {k: plate_layout(v, frames[0].dim, info[k].batch_ndim) if frames else v[0] for k, v in values.items()}
        with _Fixed(laid):
            return self.model(*args, **kwargs)


class PosteriorProposal(_GivenLatents):
    """The model with its latents drawn (with replacement) from ``draws`` (``{site: (m, *shape)}``,
    draws of the current posterior) — the proposal of SNLE and SNRE."""

    def __init__(self, model: Callable, observed, draws: Mapping[str, torch.Tensor], model_args=(), model_kwargs=None):
        self.model, self.draws = model, {k: v.detach().cpu() for k, v in draws.items()}
        self.prior = PriorDraws(model, observed, model_args, model_kwargs)

    def draw(self, n: int) -> dict[str, torch.Tensor]:
        pick = torch.randint(len(next(iter(self.draws.values()))), (n,))
        return {k: v[pick] for k, v in self.draws.items()}


class TruncatedPrior(_GivenLatents):
    """The model with its latents drawn from the prior truncated to ``region`` — a Pyro model
    ``ib.simulate`` runs like the original (by rejection from the prior inside each run)."""

    MAX_TRIES = 200  # candidates per kept draw, in units of 1 / prior mass, before giving up

    def __init__(self, model: Callable, observed, region: Region, model_args=(), model_kwargs=None):
        self.model, self.region = model, region
        self.prior = PriorDraws(model, observed, model_args, model_kwargs)
        if region.prior_mass is None:
            region.estimate_mass(self.prior)

    def draw(self, n: int) -> dict[str, torch.Tensor]:
        """``n`` latent draws from the truncated prior: ``{site: (n, *shape)}`` — candidates from
        the prior kept where they fall in the region, or from the region's envelope g kept with
        probability p/(M g) where they fall in it (module docstring)."""
        rate, envelope = self.region.acceptance, self.region.envelope
        kept, count, tried = [], 0, 0
        while count < n:
            m = min(1 << 16, math.ceil(1.2 * (n - count) / rate) + 16)
            with torch.no_grad():
                if envelope is None:
                    candidates = self.prior(m)
                    inside = self.region.contains(candidates)
                else:
                    candidates = envelope.sample(m)
                    log_ratio = envelope.log_ratio(candidates)
                    keep = (torch.rand(m, dtype=log_ratio.dtype).log() < log_ratio) & (log_ratio <= 0)
                    candidates = {k: v[keep] for k, v in candidates.items()}
                    inside = self.region.passes_test(candidates)
            kept.append({k: v[inside] for k, v in candidates.items()})
            count, tried = count + int(inside.sum()), tried + m
            if count < n and tried > self.MAX_TRIES * n / rate + 100_000:
                source = "prior draws" if envelope is None else "envelope draws"
                raise ValueError(f"truncated prior: {count} of {tried} {source} were kept in the region, far fewer "
                                 f"than its estimated acceptance {rate:.3g} promises; the region is too small to sample")
        return {k: torch.cat([d[k] for d in kept])[:n] for k in kept[0]}


# ----------------------------------------------------------------------------- regions
def _evaluate(log_density: Callable[[Mapping[str, torch.Tensor]], torch.Tensor],
              draws: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``log_density`` at every draw ``{site: (m, *shape)}``, in batches: ``(m,)``."""
    device = next(iter(draws.values())).device
    with torch.no_grad(), device_context(device):
        return torch.cat([log_density({k: v[i] for k, v in draws.items()})
                          for i in torch.arange(len(next(iter(draws.values())))).split(4096)])


def _density_region(log_density: Callable[[Mapping[str, torch.Tensor]], torch.Tensor],
                    draws: Mapping[str, torch.Tensor], quantile: float, kind: str) -> Region:
    device = next(iter(draws.values())).device
    values = _evaluate(log_density, draws)
    finite = values[torch.isfinite(values)]
    threshold = float(torch.quantile(finite.double(), quantile)) if len(finite) else -math.inf

    def contains(latents):
        return log_density(latents) >= threshold

    return Region(contains, kind, threshold, device)


def region_of(posterior: Posterior, observation: Any, prior: PriorDraws, *, quantile: float = QUANTILE,
              seed: int = 0, envelope: bool = True) -> Region:
    """The region of ``posterior`` at ``observation`` that holds all but ``quantile`` of its mass
    (module docstring), with its prior mass estimated; with ``envelope``, cut to the reach of an
    :class:`Envelope` of the posterior's draws where that keeps more candidates than the prior."""
    from .implicit_vi import ImplicitPosterior
    from .nle import NLEPosterior
    from .npe import NPEPosterior
    from .nre import NREPosterior

    flag("envelope", envelope)
    space = posterior.space
    if isinstance(posterior, NPEPosterior):
        x = posterior._observation(observation)

        def log_q(latents):
            u_s = posterior.theta_standardize(space.to_unconstrained(latents))
            return posterior.distribution(x).log_prob(u_s)

        draws = posterior.sample(DENSITY_DRAWS, observation, seed=seed)
        region = _density_region(log_q, draws, quantile, "highest-density region of the flow")
    elif isinstance(posterior, (NLEPosterior, NREPosterior)):
        draws = mcmc_draws(posterior, MCMC_DRAWS, observation, seed)
        # a few thousand MCMC draws cannot resolve a 10⁻⁴ quantile: the threshold is their minimum
        region = _density_region(unnormalised_log_posterior(posterior, observation, prior), draws, 0.0,
                                 "highest-density region of the unnormalised posterior")
    elif isinstance(posterior, ImplicitPosterior):
        region, draws = _fitted_region(posterior, observation, quantile, seed)
    else:
        raise TypeError(f"method: {type(posterior).__name__} has no region to truncate the prior to")
    if envelope:
        draws = {k: v.detach().cpu() for k, v in draws.items()}
        u = space.to_unconstrained(draws)
        proposals = [StudentT.of(u, scale) for scale in Envelope.SCALES]
        if isinstance(posterior, NPEPosterior) and widened(posterior.distribution(x), 1.0) is not None:
            proposals += [WidenedFlow(posterior, x, scale) for scale in Envelope.SCALES]
        with torch.no_grad(), seeded(seed + 2, torch.device("cpu")):
            fitted = Envelope.fit(draws, space, batched_log_joint(without_observed(prior.model, prior.observed), prior),
                                  proposals, region.passes_test)
        if fitted.log_bound < 0:  # M < 1: the envelope keeps more candidates than the prior would
            region.envelope = fitted
    with seeded(seed + 1, torch.device("cpu")):  # the mass sets the rejection batches: it must repeat
        region.estimate_mass(prior)
    return region


def unnormalised_log_posterior(posterior: Posterior, observation: Any, prior: PriorDraws
                               ) -> Callable[[Mapping[str, torch.Tensor]], torch.Tensor]:
    """log p(θ) + log q(x_o | θ) (NLE) or log p(θ) + r(θ, x_o) (NRE), batched over latents."""
    from .nle import NLEPosterior

    if isinstance(posterior, NLEPosterior):
        return batched_log_joint(posterior.condition(prior.model, posterior._observation(observation)), prior)
    prior_only = batched_log_joint(without_observed(prior.model, prior.observed), prior)

    def log_joint(latents):
        return prior_only(latents) + posterior.log_ratio(latents, observation)

    return log_joint


def mcmc_draws(posterior: Posterior, n: int, observation: Any, seed: int,
               resume: SliceResume | None = None) -> dict[str, torch.Tensor]:
    """``n`` draws of an NLE or NRE posterior by vectorized slice sampling (module docstring),
    resumed from a weighted population where one is given."""
    with warnings.catch_warnings():  # chains in separate modes have a large R-hat by design
        warnings.filterwarnings("ignore", message=r".*split R-hat", category=RuntimeWarning)
        return posterior.sample(n, observation, seed=seed, sampler="slice", resume=resume)


class _Pool:
    """The last posterior-proposal pool of a sequential run: its draws, the unnormalised log
    posterior of the posterior that drew them at each draw, and the slice axes that run ended on.
    The next round's pool resumes from it (resample-move, :class:`~implicitbayes.infer.mcmc.SliceResume`)
    where the new posterior is close enough: the importance weights (new over old unnormalised
    posterior) keep at least ``RESUME_MIN_ESS`` of the pool's draws effective."""

    def __init__(self, posterior: Posterior, draws: Mapping[str, torch.Tensor], log_joint: Callable):
        self.draws, self.values, self.axes = draws, _evaluate(log_joint, draws), posterior.mcmc.axes
        self.log_joint = log_joint
        finite = self.values[torch.isfinite(self.values)]
        self.threshold = float(finite.min()) if len(finite) else -math.inf

    def holds(self, data) -> torch.Tensor:
        """Which simulations of ``data`` (a SimulationSet) have their latents in the region of the
        posterior that drew the pool — its unnormalised log posterior at least its least value over
        the pool's draws, the region of an NLE / NRE posterior (:func:`region_of`): ``(n,)`` bool.
        Every simulation of the pool's own round is in it."""
        device = next(iter(self.draws.values())).device
        values = _evaluate(self.log_joint, {n: data[n].to(device) for n in data.latent_names})
        return (values >= self.threshold).cpu()

    def resume(self, log_joint: Callable) -> tuple[SliceResume | None, float]:
        """The weighted population for the next posterior (None where its weights are too
        uneven, or the last run left no axes) and the weights' effective fraction."""
        weights = _evaluate(log_joint, self.draws) - self.values
        if self.axes is None or not bool(torch.isfinite(weights).any()):
            return None, 0.0  # nothing to resume along, or no draw the new posterior allows: start cold
        resume = SliceResume(self.draws, weights, self.axes)
        fraction = resume.effective_size() / len(weights)
        return (resume if fraction >= RESUME_MIN_ESS else None), fraction


class DrawDensity:
    """A density fitted to draws: a MAF g(z) trained by maximum likelihood on ``(m, d)`` points,
    which it sees standardised by their own mean and spread (``loc``, ``scale``); ``log_prob``
    is g's log density at the points as given. ImplicitVI's region is a highest-density region
    of one fitted to its draws (module docstring)."""

    TRAINING = TrainConfig(batch_size=256, lr=1e-3, max_steps=5_000, patience=10)
    HIDDEN = (64, 64)

    def __init__(self, flow: torch.nn.Module, loc: torch.Tensor, scale: torch.Tensor):
        self.flow, self.loc, self.scale = flow, loc, scale

    @classmethod
    def fit(cls, z: torch.Tensor, seed: int) -> "DrawDensity":
        z = z.detach()
        loc, scale = z.mean(0), z.std(0).clamp_min(torch.finfo(z.dtype).eps)
        with seeded(seed, z.device):
            flow = build_flow("maf", z.shape[1], hidden_features=cls.HIDDEN).to(z.device)
        g = cls(flow, loc, scale)
        u = (z - loc) / scale

        def step(rows, generator):
            return {"nll": -flow().log_prob(u[rows.to(z.device)]).mean()}

        def validate(rows):
            return float(-flow().log_prob(u[rows.to(z.device)]).mean())

        train({"density": flow}, step, validate, len(z), cls.TRAINING, seed=seed, progress=False,
              desc="density of the draws")
        flow.eval()
        return g

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            u = (z.to(self.loc.device) - self.loc) / self.scale
            return torch.cat([self.flow().log_prob(u[i]) - self.scale.log().sum()
                              for i in torch.arange(len(u)).split(8192)]).to(z.device)


def _fitted_region(posterior, observation, quantile: float, seed: int) -> tuple[Region, dict[str, torch.Tensor]]:
    space = posterior.space
    draws = posterior.sample(FIT_DRAWS + DENSITY_DRAWS, observation, seed=seed)
    with torch.no_grad():
        s = posterior.theta_standardize(space.to_unconstrained({k: v[:FIT_DRAWS] for k, v in draws.items()}))
    density = DrawDensity.fit(s, seed)

    def log_g(latents):
        return density.log_prob(posterior.theta_standardize(space.to_unconstrained(latents)))

    calibration = {k: v[FIT_DRAWS:] for k, v in draws.items()}
    region = _density_region(log_g, calibration, quantile,
                             "highest-density region of a flow fitted to the posterior's draws")
    return region, calibration


# ----------------------------------------------------------------------------- driver
def _round_seeds(seed: int, r: int) -> tuple[int, int, int]:
    state = np.random.SeedSequence([seed, r]).generate_state(6, np.uint32).view(np.uint64) >> 2
    return int(state[0]), int(state[1]), int(state[2])


@sharing_trial_runs
def sequential(method, *, observation: Any, num_simulations: int, rounds: int = 5, seed: int | None = None,
               store=None, progress: bool = True, quantile: float = QUANTILE, proposal: str = "auto",
               warm_start: bool | str = "auto") -> Posterior:
    """A posterior focused on ``observation``, trained on ``rounds`` rounds of simulations from
    the prior truncated to the previous round's posterior region (module docstring).

    ``method`` is a configured method (``ib.NPE(model, observed="x")``; NLE, NRE and ImplicitVI
    too). ``num_simulations`` are split evenly over the rounds (the first takes the remainder).
    The returned posterior samples at ``observation`` by default (``.sample(n)``) and records
    each round in ``.rounds`` (simulations, the region's prior mass, seconds). The rounds simulate
    on the CPU, as ``ib.simulate`` does by default (the simulator is the user's code), and train
    on the method's ``device``. ``store``: a
    directory that makes the run resumable (module docstring). ``quantile``: the posterior mass a
    region may leave out. ``proposal``: where later rounds simulate — "truncated" (the prior
    truncated to the posterior's region), "posterior" (at draws of the current posterior; NLE and
    NRE only), or "auto", the latter for NLE and NRE and the former otherwise (module docstring).
    ``warm_start``: whether each round's fit starts from the previous round's posterior (True) or
    afresh (False) on all rounds' simulations — for NLE and NRE with posterior proposals, on those
    whose parameters lie in the proposing posterior's region; "auto": afresh for NPE, ImplicitVI
    and NLE, warm for NRE (module docstring). Each round's record holds the simulations its fit
    trained on (``training_simulations``)."""
    from .abc import ABC
    from .lfvi import LFVI
    from .nle import NLE
    from .nre import NRE

    if isinstance(method, ABC):
        raise TypeError("method: ABC does not run in rounds here; its own sequential scheme is SMC-ABC: "
                        "ib.ABC(model, observed=..., algorithm='smc').fit(observation=...)")
    if isinstance(method, LFVI) or not hasattr(method, "fit") or "init" not in _fit_parameters(method):
        raise TypeError(f"method: expected a configured ib.NPE, ib.NLE, ib.NRE or ib.ImplicitVI, got "
                        f"{type(method).__name__}")
    rounds = integer("rounds", rounds)
    num_simulations = integer("num_simulations", num_simulations)
    if num_simulations < rounds:
        raise ValueError(f"num_simulations: {num_simulations} simulations cannot be split over {rounds} rounds; "
                         "give at least one per round")
    number("quantile", quantile, low=0.0, high=1.0, what="a fraction in (0, 1)")
    learns_likelihood = isinstance(method, (NLE, NRE))
    if flag_or_auto("warm_start", warm_start) == "auto":
        warm_start = isinstance(method, NRE)
    proposal = choice("proposal", proposal, PROPOSALS)
    if proposal == "auto":
        proposal = "posterior" if learns_likelihood else "truncated"
    if proposal == "posterior" and not learns_likelihood:
        raise ValueError(f"proposal: 'posterior' needs a method that learns the likelihood (ib.NLE) or a likelihood "
                         f"ratio (ib.NRE), which any proposal leaves unbiased; {type(method).__name__} learns the "
                         "posterior itself and runs with proposal='truncated'")
    seed = resolve_seed(seed)
    sites, _ = model_sites(method.model, method.observed, method.model_args, method.model_kwargs)
    shapes = {s.name: s.shape for s in sites if s.observed}
    values = observed_values(observation, method.observed, shapes, torch.device("cpu"), torch.get_default_dtype())
    budgets = [num_simulations // rounds + (num_simulations % rounds if r == 0 else 0) for r in range(rounds)]
    directory = _open_store(store, method, values, num_simulations, rounds, seed, quantile, proposal, warm_start)
    prior = PriorDraws(method.model, method.observed, method.model_args, method.model_kwargs)

    data, posterior, record, pool = None, None, [], None
    for r in range(rounds):
        t0 = time.perf_counter()
        sim_seed, fit_seed, region_seed = _round_seeds(seed, r)
        region, model, before, pooled = None, method.model, posterior, None
        if posterior is not None and proposal == "truncated":
            region = region_of(posterior, values, prior, quantile=quantile, seed=region_seed)
            model = TruncatedPrior(method.model, method.observed, region, method.model_args, method.model_kwargs)
        elif posterior is not None:
            log_joint = unnormalised_log_posterior(posterior, values, prior)
            resume, fraction = pool.resume(log_joint) if pool is not None else (None, None)
            draws = mcmc_draws(posterior, max(POOL_FACTOR * budgets[r], MCMC_DRAWS), values, region_seed, resume)
            pool = _Pool(posterior, draws, log_joint)
            pooled = {"resumed": resume is not None, "effective_fraction": fraction}
            model = PosteriorProposal(method.model, method.observed, draws, method.model_args, method.model_kwargs)
        part = simulate(model, budgets[r], observed=method.observed, model_args=method.model_args,
                        model_kwargs=method.model_kwargs, seed=sim_seed, progress=progress,
                        store=None if directory is None else directory / f"round-{r + 1}")
        data = part if data is None else data.extend(part)
        train = data
        if pool is not None and not warm_start:  # a fresh fit learns the likelihood where the posterior is
            train = data.subset(pool.holds(data))
        saved = None if directory is None else directory / f"round-{r + 1}.posterior.safetensors"
        if saved is not None and saved.exists():
            posterior = _load_round(saved, method)
        else:
            checkpoint = None if directory is None else directory / f"round-{r + 1}.checkpoint"
            posterior = method.fit(train, seed=fit_seed, progress=progress, checkpoint=checkpoint,
                                   init=posterior if warm_start else None)
            if saved is not None:
                posterior.save(saved)
        record.append({"round": r + 1, "simulations": len(part), "total_simulations": len(data),
                       "training_simulations": len(train),
                       "proposal": "prior" if before is None else proposal,
                       "warm_start": before is not None and warm_start,
                       "prior_mass": 1.0 if before is None else None if region is None else region.prior_mass,
                       "acceptance": None if region is None else region.acceptance,
                       "envelope": region is not None and region.envelope is not None,
                       "region": None if region is None else {"kind": region.kind, "threshold": region.threshold},
                       "pool": pooled,
                       "seconds": time.perf_counter() - t0})
    posterior.rounds = record
    posterior.training_summary["rounds"] = record
    return posterior.set_default_observed(values)


def _fit_parameters(method) -> set[str]:
    return set(inspect.signature(method.fit).parameters)


def _open_store(store, method, values, num_simulations, rounds, seed, quantile, proposal,
                warm_start) -> Path | None:
    if store is None:
        return None
    directory = Path(store)
    digest = hashlib.sha256(b"".join(v.numpy().tobytes() for v in values.values())).hexdigest()[:16]
    manifest = {"kind": "implicitbayes.Sequential", "version": 1, "method": type(method).__name__,
                "num_simulations": num_simulations, "rounds": rounds, "seed": seed, "quantile": quantile,
                "proposal": proposal, "warm_start": warm_start,
                "observation": digest}
    path = directory / "sequential.json"
    if path.exists():
        old = json.loads(path.read_text())
        old.setdefault("warm_start", True)  # stores written before the option: warm-started
        differ = {k: (old.get(k), v) for k, v in manifest.items() if old.get(k) != v}
        if differ:
            raise StoreMismatchError(f"store: {directory} holds a sequential run with other settings "
                                     f"(stored, asked): {differ}; use another directory")
    else:
        if directory.exists() and any(directory.iterdir()):
            raise ValueError(f"store: {directory} is a non-empty directory that is not a sequential run's store")
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(manifest, indent=1))
    return directory


def _load_round(path: Path, method) -> Posterior:
    """A finished round's posterior, read back with the method's custom networks (if any)."""
    modules = {}
    for name, attr in (("embedding", "embedding"), ("flow", "flow_builder"), ("classifier", "classifier"),
                       ("generator", "generator"), ("critic", "critic")):
        value = getattr(method, attr, None)
        if value is not None and not isinstance(value, str):
            modules[name] = value
    post = load(path, model=method.model, model_args=method.model_args, model_kwargs=method.model_kwargs, **modules)
    return post.to(method.device)

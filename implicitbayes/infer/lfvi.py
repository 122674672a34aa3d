r"""Likelihood-free variational inference for hierarchical implicit models
(Tran, Ranganath & Blei 2017, "Hierarchical Implicit Models and Likelihood-Free Variational
Inference", NeurIPS).

Model: global latents β ~ p(β); for groups n = 1..N inside a ``pyro.plate``, local latents and
data (z_n, x_n) ~ p(x_n, z_n | β), sample-only (``ib.Implicit``). Variational family:
q(β) a normalizing flow (tractable density) and an implicit local sampler
z_n = g(x_n, β, ε_n), ε_n ~ N(0, I). The ELBO, up to the constant Σ_n log q_data(x_n), is

    L = E_{q(β)}[ log p(β) − log q(β) ] + Σ_n E_{q(β) q(z_n | x_n, β)}[ r(x_n, z_n, β) ],
    r(x, z, β) ≈ log p(x, z | β) − log q_data(x) q(z | x, β),

where the ratio r is a critic trained by the logistic loss to tell model draws
(x, z) ~ p(· | β) (label 1) from variational draws (x_n, z_n ~ q(z | x_n, β)) (label 0) at
the same β. Gradients of L reach q(β) and g through r's inputs (reparameterisation), never
through the simulator. Minibatches of M groups scale the local sum by N/M.

The reference for x. With q_data, the empirical distribution of N points, the two classes are
separable by x alone, the logistic loss saturates and the critic learns nothing about z and β
at the data (on ``hierarchical_gaussian`` the local 90 % intervals then cover far less than
90 %; ``benchmarks/results/lfvi_hierarchical.md``). We therefore draw the x of the variational class from the
model's own predictive p̄(x) = ∫ p(x | β') q(β') dβ' — the x simulated at *another* particle
β' — with z ~ q(z | x, β). The optimal critic is then
r = log p(x, z | β) − log p̄(x) q(z | x, β): it differs from Tran's ratio by log q_data(x) −
log p̄(x), a function of x alone, so at the data the gradients in z and β — all that training
uses — are the same, while both classes now overlap wherever the model can produce the data.

The local family. Tran et al.'s q(z | x, β) is implicit, so r must also carry −log q(z | x, β),
and a smooth critic cannot follow a q that narrows: the part of its gradient that would widen q
fades, and q drifts toward a point wherever the local posterior is much narrower than the prior
(x_n = z_n + 0.1 ε, ``tests/test_lfvi.py``: local means off by up to 1.4 sd, sds 0.74–1.64×). With
``local="flow"`` (the default) q(z | x, β) is a conditional spline flow, and the critic's logit is written
c(x, (z, β)) − log q(z | x, β), trained on the same two classes: its network c then learns
log p(x, z | β) − log p̄(x), which does not move with q, and the ELBO's E_q[c − log q] takes q's
entropy exactly (the same test: means within 0.2 sd, sds within 16 %). Training still never
evaluates the model's density of x or z. The flow's layers are inverted (IAF orientation,
``implicitbayes.nn.inverted_layers``): the draws a step differentiates through are one pass of
each network, and only the densities of the simulated z, taken without gradients, pay the D
autoregressive passes. On the LV population model (four local dimensions) a step costs about 1.3×
the implicit one (2× in MAF orientation); on ``hierarchical_gaussian`` (one local dimension, where
the orientations cost the same) a fit takes about 2× the implicit one's.

Critic and variational parameters take simultaneous Adam steps on one draw of S global
particles per step: the critic on its classification loss with its inputs detached, q(β) and g
on −L/N through a copy of the critic whose weights are detached. All coordinates are
unconstrained (``biject_to`` of each support) and standardised by a pilot simulation from the
prior.

Every particle β drawn from q is simulated, so q's tails must stay where the model can be run.
q(β) therefore starts at the prior (a few hundred steps of KL(p ‖ q) + KL(q ‖ p), no simulator
runs) rather than at a standard normal in the standardised coordinates, and an affine
autoregressive layer comes before its spline flow so that its tails scale with its spread (a
spline's tails are the identity). Without them, on ``lotka_volterra_population`` q drew
σ ≈ 40 where the prior has none, the rates exp(log θ) overflowed and the fit stopped.

The default budget (8 000 steps of 64 global particles) is the one that met the accuracy targets
in ``benchmarks/results/lfvi_hierarchical.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import pyro
import pyro.poutine as poutine
from pyro.poutine.runtime import NonlocalExit
from pyro.poutine.subsample_messenger import _Subsample
import torch
from torch import nn
from torch.func import functional_call

from ..checks import choice, flag, integer, number
from ..errors import IntractableLikelihoodError, TrainingError
from ..nn import FLOWS, Critic, ImplicitGenerator, Standardize, build_flow, inverted_layers
from ..seeding import fresh_seed, resolve_seed, seeded
from ..simulate import _OUTER_PLATE, SiteInfo, device_context, model_sites, plate_layout, run_given, sharing_trial_runs
from ..space import ParameterSpace, SiteSpace
from .data import observed_values
from .method import Method, network_builder
from .objectives import RatioCriticLoss
from .posterior import Posterior, PosteriorConfig, build_network, register_posterior
from .training import TrainConfig, resolve_training, train

__all__ = ["LFVI", "LFVIPosterior", "LFVIConfig"]

_CUSTOM_FLOW_LOCAL = ("generator: a custom generator is an implicit local sampler; with local='flow' q(z | x, β) is "
                      "a conditional flow of the sizes hidden/layers (leave generator out, or use local='implicit')")


@dataclass
class LFVIConfig(PosteriorConfig):
    """The networks of an :class:`LFVIPosterior` and the layout of the data it was fitted to."""

    flow: str  # a name in implicitbayes.nn.FLOWS, or "custom" for a build callable
    generator: str  # "mlp" (ImplicitGenerator of the sizes below) or "custom"
    critic: str  # "mlp" (Critic of the sizes below) or "custom"
    transforms: int
    flow_hidden: tuple[int, ...]
    hidden: int
    layers: int
    noise_features: int | None
    critic_hidden: int
    critic_layers: int
    global_sites: tuple[str, ...]
    local_sites: tuple[str, ...]
    num_groups: int
    x_group_shape: tuple[int, ...]
    plate: str
    affine_first: bool = False  # an affine autoregressive layer before q(β)'s flow (files before it: none)
    local: str = "implicit"  # q(z | x, β): "implicit" (the generator) or "flow" (files before it: implicit)
    # the local flow's layers inverted (IAF orientation): a draw is one pass of each network, which
    # training takes with gradients at every step (files before it: MAF orientation, D passes)
    local_one_pass: bool = False


def _group_space(space: ParameterSpace) -> ParameterSpace:
    """The local sites of one group: each site's shape without its leading plate dim."""
    return ParameterSpace([SiteSpace(s.name, s.shape[1:], s.support, s.transform, s.event_dim) for s in space.sites])


@register_posterior
class LFVIPosterior(Posterior):
    """q(β) q(z_{1:N} | x_{1:N}, β) for the one dataset it was fitted to.

    ``sample(n)`` returns every latent site (global and local) with the model's shapes;
    ``log_prob_global`` evaluates the flow's density of the global sites.
    """

    method = "lfvi"
    Config = LFVIConfig

    def __init__(self, space: ParameterSpace, observed, x_shapes, config: LFVIConfig,
                 flow: Callable[[int, int], nn.Module] | None = None,
                 generator: Callable[[int, int], nn.Module] | None = None,
                 critic: Callable[[int, int], nn.Module] | None = None):
        super().__init__(space, observed, x_shapes, config)
        by_name = {s.name: s for s in space.sites}
        self.global_space = ParameterSpace([by_name[n] for n in config.global_sites])
        self.local_space = _group_space(ParameterSpace([by_name[n] for n in config.local_sites]))
        self.num_groups = int(config.num_groups)
        dg, dl = self.global_space.unconstrained_dim, self.local_space.unconstrained_dim
        self.x_group_shape = tuple(config.x_group_shape)
        dx = math.prod(self.x_group_shape)
        self.x_standardize = Standardize(self.x_group_shape)
        self.global_standardize = Standardize((dg,), log=False, robust=False)
        self.local_standardize = Standardize((dl,), log=False, robust=False)
        self.q_global = build_network("flow", config.flow == "custom", flow, lambda: build_flow(
            config.flow, dg, 0, transforms=config.transforms, hidden_features=config.flow_hidden,
            affine_first=config.affine_first), dg, 0)
        if config.local == "flow":
            if config.generator == "custom":
                raise ValueError(_CUSTOM_FLOW_LOCAL)
            local = build_flow("nsf", dl, dx + dg, transforms=config.transforms,
                               hidden_features=(config.hidden,) * (config.layers - 1), affine_first=True)
            self.generator = inverted_layers(local) if config.local_one_pass else local
        else:
            self.generator = build_network("generator", config.generator == "custom", generator, lambda: ImplicitGenerator(
                dx + dg, dl, config.noise_features, config.hidden, config.layers), dx + dg, dl)
        if config.local == "implicit" and not isinstance(getattr(self.generator, "noise_features", None), int):
            raise TypeError("generator: the module needs an integer noise_features attribute (the width k of the "
                            "noise (n, m, k) it takes), as ib.nn.ImplicitGenerator has")
        self.critic = build_network("critic", config.critic == "custom", critic, lambda: Critic(
            dl + dg, dx, config.critic_hidden, config.critic_layers), dl + dg, dx)
        self.register_buffer("observation", torch.zeros(self.num_groups, dx))

    # -- pieces used by training and sampling ----------------------------------------------
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Standardised per-group observations ``(..., *x_group_shape)`` → ``(..., dx)``."""
        lead = x.shape[:x.dim() - len(self.x_group_shape)]
        return self.x_standardize(x.reshape((-1,) + self.x_group_shape)).reshape(lead + (-1,))

    def draw_global(self, num: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``num`` reparameterised draws of standardised unconstrained β and their log q."""
        q = self.q_global()
        eps = torch.randn((num, self.global_space.unconstrained_dim), generator=generator, device=self.device)
        b_s, ladj = q.transform.inv.call_and_ladj(eps)
        return b_s, q.base.log_prob(eps) - ladj

    def _local_context(self, feats: torch.Tensor, b_s: torch.Tensor) -> torch.Tensor:
        """The context (x_n, β) of q(z | x, β): ``feats (M, dx)`` or ``(S, M, dx)``, ``b_s (S, dg)`` →
        ``(S·M, dx + dg)``."""
        s, m = b_s.shape[0], feats.shape[-2]
        feats = feats.expand(s, -1, -1) if feats.dim() == 3 else feats[None].expand(s, -1, -1)
        return torch.cat([feats, b_s[:, None].expand(-1, m, -1)], -1).reshape(s * m, -1)

    def draw_local(self, feats: torch.Tensor, b_s: torch.Tensor, generator: torch.Generator,
                   log_prob: bool = False):
        """z_n ~ q(z | x_n, β): ``feats (M, dx)`` or ``(S, M, dx)``, ``b_s (S, dg)`` → standardised
        ``(S, M, dl)``; with ``log_prob`` also log q(z | x_n, β) ``(S, M)`` (``local="flow"`` only: the
        implicit generator has no density)."""
        s, m = b_s.shape[0], feats.shape[-2]
        ctx = self._local_context(feats, b_s)
        if self.config.local == "flow":
            q = self.generator(ctx)
            eps = torch.randn((s * m, self.local_space.unconstrained_dim), generator=generator, device=ctx.device,
                              dtype=ctx.dtype)
            z, ladj = q.transform.inv.call_and_ladj(eps)
            z = z.reshape(s, m, -1)
            return (z, (q.base.log_prob(eps) - ladj).reshape(s, m)) if log_prob else z
        if log_prob:
            raise ValueError("log_prob: the implicit local generator has no density (local='flow' has one)")
        noise = torch.randn((s * m, 1, self.generator.noise_features), generator=generator, device=ctx.device,
                            dtype=ctx.dtype)
        return self.generator(ctx, noise).reshape(s, m, -1)

    def local_log_prob(self, feats: torch.Tensor, b_s: torch.Tensor, z_s: torch.Tensor) -> torch.Tensor:
        """log q(z | x_n, β) of standardised ``z_s (S, M, dl)`` (``local="flow"``): ``(S, M)``."""
        s, m = z_s.shape[:2]
        return self.generator(self._local_context(feats, b_s)).log_prob(z_s.reshape(s * m, -1)).reshape(s, m)

    def assemble(self, b_s: torch.Tensor, z_s: torch.Tensor) -> dict[str, torch.Tensor]:
        """Standardised draws ``(S, dg)``, ``(S, N, dl)`` → ``{site: (S, *shape)}`` on the supports."""
        s, n = z_s.shape[:2]
        out = self.global_space.to_constrained(self.global_standardize.inverse(b_s))
        local = self.local_space.to_constrained(self.local_standardize.inverse(z_s.reshape(s * n, -1)))
        out.update({k: v.reshape((s, n) + tuple(v.shape[1:])) for k, v in local.items()})
        return out

    # -- the Posterior interface -------------------------------------------------------------
    def _observation(self, observed):
        if observed is None:
            observed = self.default_observed
        if observed is None:
            return self.observation
        x = observed_values(observed, self.observed, self.x_shapes, self.device, self.observation.dtype)
        flat = torch.cat([v.reshape(self.num_groups, -1) for v in x.values()], 1)
        if not torch.allclose(flat, self.observation):
            raise ValueError("observed: LFVI is fitted to one dataset; this is another one (fit again with it)")
        return flat

    @torch.no_grad()
    def _draw(self, x, num_samples: int, seed: int) -> dict[str, torch.Tensor]:
        """``num_samples`` joint draws of the global and local latents: ``{site: (num_samples, *shape)}``."""
        generator = torch.Generator(device=self.device).manual_seed(seed)
        feats = self.features(self.observation.reshape((self.num_groups,) + self.x_group_shape))
        out = []
        for chunk in torch.arange(num_samples).split(max(1, 100_000 // self.num_groups)):
            b_s, _ = self.draw_global(len(chunk), generator)
            out.append(self.assemble(b_s, self.draw_local(feats, b_s, generator)))
        return {k: torch.cat([o[k] for o in out]) for k in out[0]}

    @torch.no_grad()
    def log_prob_global(self, values: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """log q(β) of the global sites ``{site: (n, *shape)}`` in their own coordinates: ``(n,)``."""
        u = self.global_space.to_unconstrained({k: torch.as_tensor(values[k], device=self.device)
                                                for k in self.global_space.names})
        log_q = self.q_global().log_prob(self.global_standardize(u)) - self.global_standardize.scale.log().sum()
        return log_q - self.global_space.log_abs_det_jacobian(u)


class _GlobalPrior:
    """log p(β) of the global sites, differentiable in β, and draws from p(β): the model is run
    (conditioned on β, or not) and stopped (``poutine.escape``) at its first local site, so no
    simulator is called."""

    def __init__(self, model, model_args, model_kwargs, global_info: Mapping[str, SiteInfo], outer_dim: int,
                 device: torch.device):
        self.model, self.args, self.kwargs = model, model_args, model_kwargs
        self.info, self.outer_dim, self.device = dict(global_info), outer_dim, device

    def _globals(self, n: int, data: Mapping[str, torch.Tensor]) -> dict:
        """The trace nodes of the global sites for ``n`` copies of the model under the outer plate."""
        escape = poutine.escape(poutine.condition(self.model, data=data), escape_fn=lambda msg: (
            msg["type"] == "sample" and msg["name"] not in self.info and not isinstance(msg["fn"], _Subsample)
            and not msg["is_observed"]))
        tracer = poutine.trace(escape)
        try:
            with device_context(self.device), pyro.plate(_OUTER_PLATE, n, dim=self.outer_dim):
                tracer.get_trace(*self.args, **self.kwargs)
        except NonlocalExit:
            pass
        nodes = tracer.msngr.trace.nodes
        missing = [k for k in self.info if k not in nodes]
        if missing:
            raise ValueError(f"LFVI: the global sites {missing} come after a local site in the model; "
                             "sample every global latent before the plate of groups")
        return {name: nodes[name] for name in self.info}

    def sample(self, n: int) -> dict[str, torch.Tensor]:
        """``n`` draws of the global sites from their prior (Pyro's RNG): ``{site: (n, *shape)}``."""
        with torch.no_grad():
            return {k: site["value"].reshape((n,) + tuple(self.info[k].shape))
                    for k, site in self._globals(n, {}).items()}

    def __call__(self, values: Mapping[str, torch.Tensor]) -> torch.Tensor:
        n = next(iter(values.values())).shape[0]
        data = {k: plate_layout(v, self.outer_dim, self.info[k].batch_ndim) for k, v in values.items()}
        total = 0.0
        for name, site in self._globals(n, data).items():
            try:
                lp = site["fn"].log_prob(site["value"])
            except NotImplementedError as e:
                raise IntractableLikelihoodError(
                    f"LFVI: the global site '{name}' has no tractable prior density ({e}); LFVI needs "
                    "explicit priors on the global latents (local latents may be implicit)") from e
            total = total + lp.reshape(n, -1).sum(-1)
        return total


class LFVI(Method):
    """Likelihood-free variational inference for hierarchical implicit models (module docstring).

    The data are N groups inside a ``pyro.plate`` (``plate``, default: the plate around the
    observed site); latent sites inside that plate are local, the others global. Every local and
    observed site must have the plate as its only batch dimension.

    Options: the objective's ``num_particles`` S draws of β per step and ``groups_per_step`` M
    (None: all N); the networks, ``flow`` (a name in ``implicitbayes.nn.FLOWS``) / ``transforms`` /
    ``flow_hidden`` / ``affine_first`` of q(β) (an affine autoregressive layer before the flow, so
    that q's tails scale with its spread: a spline's tails are the identity), ``hidden`` /
    ``layers`` of the local generator, ``critic_hidden`` / ``critic_layers`` of the critic — or build callables in their place: ``flow(features, 0)``
    (an unconditional zuko-style flow), ``generator(context_features, theta_features)`` (a module
    ``(context (n, e), noise (n, m, k)) -> (n, m, d)`` with a ``noise_features`` attribute, e.g.
    ``partial(ib.nn.ImplicitGenerator, noise_features=8)``) and ``critic(theta_features,
    context_features)``, passed again to ``ib.load`` — the critic's learning rate being
    ``critic_lr_scale`` times the others'; ``pilot_simulations`` from the prior that standardise the coordinates;
    ``prior_steps`` on KL(p ‖ q) + KL(q ‖ p) of the global sites that start q(β) at the prior, no
    simulations (0: q starts at the standard normal of the standardised coordinates); ``local``, the
    family of q(z | x, β): ``"implicit"`` (the generator, Tran et al.'s) or ``"flow"`` (a conditional
    spline flow, an affine autoregressive layer and ``transforms`` splines whose conditioners have
    ``layers − 1`` hidden layers of ``hidden`` units, inverted so a draw is one pass of each, whose
    density enters the critic's logit; module docstring). Default: ``"flow"``, or ``"implicit"``
    where a custom ``generator`` is given;
    ``training`` (a :class:`~implicitbayes.TrainConfig` or a mapping of fields changing
    ``LFVI.TRAINING``: 8 000 steps, no held-out rows — LFVI validates on the observation's ELBO);
    ``device``.
    """

    TRAINING = TrainConfig(batch_size=1, lr=1e-3, max_steps=8000, validation_fraction=0.0, validate_every=100,
                           patience=10**9, restore_best=False, clip_grad_norm=10.0)

    def __init__(self, model: Callable, *, observed: str | Sequence[str], model_args: tuple = (),
                 model_kwargs: Mapping | None = None, plate: str | None = None, num_particles: int = 64,
                 groups_per_step: int | None = None, flow: str | Callable[[int, int], nn.Module] = "nsf",
                 transforms: int = 3, flow_hidden: Sequence[int] = (64, 64), affine_first: bool = True,
                 hidden: int = 128, layers: int = 3,
                 critic_hidden: int = 128, critic_layers: int = 3,
                 generator: Callable[[int, int], nn.Module] | None = None,
                 critic: Callable[[int, int], nn.Module] | None = None, critic_lr_scale: float = 10.0,
                 pilot_simulations: int = 256, prior_steps: int = 500, local: str | None = None,
                 training: TrainConfig | Mapping | None = None, device: str | torch.device | None = None):
        super().__init__(model, observed=observed, model_args=model_args, model_kwargs=model_kwargs, device=device)
        self.plate = plate
        local = ("implicit" if generator is not None else "flow") if local is None else local
        choice("local", local, ("implicit", "flow"))
        if local == "flow" and generator is not None:
            raise ValueError(_CUSTOM_FLOW_LOCAL)
        self.num_particles = integer("num_particles", num_particles, minimum=2)
        self.groups_per_step = integer("groups_per_step", groups_per_step, none=True)
        self.pilot_simulations = integer("pilot_simulations", pilot_simulations, minimum=2)
        self.prior_steps = integer("prior_steps", prior_steps, minimum=0)
        self.critic_lr_scale = number("critic_lr_scale", critic_lr_scale)
        self.builders = {
            "flow": network_builder("flow", flow, {"transforms": (transforms, 3), "flow_hidden": (tuple(flow_hidden),
                                                                                                (64, 64)),
                                                 "affine_first": (affine_first, True)})
            if callable(flow) else None,
            "generator": network_builder("generator", generator, {"hidden": (hidden, 128), "layers": (layers, 3)}),
            "critic": network_builder("critic", critic, {"critic_hidden": (critic_hidden, 128),
                                                         "critic_layers": (critic_layers, 3)})}
        self.net = {"flow": "custom" if self.builders["flow"] else choice("flow", flow, FLOWS),
                    "generator": "custom" if self.builders["generator"] else "mlp",
                    "critic": "custom" if self.builders["critic"] else "mlp",
                    "transforms": integer("transforms", transforms), "flow_hidden": tuple(flow_hidden),
                    "affine_first": False if self.builders["flow"] else flag("affine_first", affine_first),
                    "hidden": integer("hidden", hidden), "layers": integer("layers", layers), "noise_features": None,
                    "critic_hidden": integer("critic_hidden", critic_hidden),
                    "critic_layers": integer("critic_layers", critic_layers), "local": local}
        self.training = resolve_training(self.TRAINING, training)

    # -- reading the model ---------------------------------------------------------------------
    def _layout(self):
        sites, outer_dim = model_sites(self.model, self.observed, self.model_args, self.model_kwargs)
        obs = [s for s in sites if s.observed]
        plates = set(obs[0].plates)
        for s in obs[1:]:
            plates &= set(s.plates)
        if self.plate is not None:
            if self.plate not in plates:
                raise ValueError(f"plate: {self.plate!r} is not a plate around every observed site; those have "
                                 f"{sorted(plates) or 'none'}")
            plates = {self.plate}
        if len(plates) != 1:
            raise ValueError("LFVI needs the observed sites inside one pyro.plate over groups (the local plate); "
                             f"found {sorted(plates) or 'none'}" + ("; name it with plate=" if plates else ""))
        plate = plates.pop()
        local = [s for s in sites if plate in s.plates]
        glob = [s for s in sites if plate not in s.plates and not s.observed]
        if not glob:
            raise ValueError(f"LFVI: the model has no global latent sites outside plate {plate!r}")
        sizes = {s.shape[0] if s.shape else None for s in local}
        for s in local:
            if s.batch_ndim != 1:
                raise ValueError(f"LFVI: site '{s.name}' has batch shape {s.shape[:s.batch_ndim]}; local sites need "
                                 f"the plate {plate!r} as their only batch dimension")
        if len(sizes) != 1:
            raise ValueError(f"LFVI: the sites in plate {plate!r} disagree on its size: {sorted(map(str, sizes))}")
        return sites, outer_dim, plate, glob, [s for s in local if not s.observed], obs, sizes.pop()

    @sharing_trial_runs
    def fit(self, data=None, *, observation: Any, max_steps: int | None = None, time_budget: float | None = None,
            seed: int | None = None, progress: bool = True, checkpoint=None) -> LFVIPosterior:
        """Fit q to ``observation`` (a tensor of the observed site's shape, or ``{site: tensor}``).

        LFVI simulates as it trains (model draws at the current q(β)); ``data`` is an optional
        ``ib.SimulationSet`` from the prior used instead of the pilot simulation to standardise.
        ``posterior.training_summary["simulations"]`` counts the simulated groups.
        """
        loop = self.training.with_fit(max_steps, time_budget)
        seed = resolve_seed(seed)
        sites, outer_dim, plate, glob, local, obs, n_groups = self._layout()
        if not local:
            raise ValueError(f"LFVI: the model has no local latent sites inside plate {plate!r}")
        x_obs = observed_values(observation, self.observed, {s.name: s.shape for s in obs}, self.device,
                                torch.get_default_dtype())
        x_flat = torch.cat([x_obs[s.name].reshape(n_groups, -1) for s in obs], 1)
        x_group_shape = tuple(obs[0].shape[1:] if len(obs) == 1 else (x_flat.shape[1],))
        latent_names = [s.name for s in glob] + [s.name for s in local]
        space = ParameterSpace.from_model(self.model, latent_names, self.model_args, self.model_kwargs)
        config = LFVIConfig(**self.net, global_sites=tuple(s.name for s in glob),
                            local_sites=tuple(s.name for s in local), num_groups=n_groups,
                            x_group_shape=x_group_shape, plate=plate, local_one_pass=self.net["local"] == "flow")
        s_particles = self.num_particles
        m = min(self.groups_per_step or n_groups, n_groups)
        with seeded(seed, self.device):
            post = LFVIPosterior(space, self.observed, {s.name: s.shape for s in obs}, config,
                                 **self.builders).to(self.device)
            post.observation.copy_(x_flat)
            ginfo = {s.name: s for s in glob}
            simulator = _GroupSimulator(self, post, ginfo, local, obs, outer_dim, n_groups)
            self._fit_standardizers(post, data, seed, latent_names, obs, n_groups, simulator)
            prior = _GlobalPrior(self.model, self.model_args, self.model_kwargs, ginfo, outer_dim, self.device)
            objective = LFVIObjective(post, prior)
            self._start_at_prior(post, prior, objective)
            feats_obs = post.features(x_flat.reshape((n_groups,) + x_group_shape))
            flow_local = config.local == "flow"

            def step(_, g):
                b_s, log_q_s = post.draw_global(s_particles, g)
                idx = torch.randperm(n_groups, generator=g, device=g.device)[:m].to(self.device)
                with torch.no_grad():
                    z_u, x_sim = simulator(b_s.detach(), fresh_seed(g))
                    z_model = post.local_standardize(z_u[:, idx].reshape(s_particles * m, -1)).reshape(s_particles, m, -1)
                    f_model = post.features(x_sim[:, idx].reshape((s_particles, m) + x_group_shape))
                    # the reference class: x simulated at another particle β', z ~ q(z | x, β)
                    shift = int(torch.randint(1, s_particles, (), generator=g, device=g.device))
                    f_ref = f_model.roll(shift, 0)
                    # with a flow the critic's logit is c − log q(z | x, β): q's density at each pair
                    lq_model = post.local_log_prob(f_model, b_s.detach(), z_model) if flow_local else None
                    z_ref, lq_ref = self._draw_local(post, f_ref, b_s.detach(), g, flow_local)
                f_data = feats_obs[idx]
                z_data, lq_data = self._draw_local(post, f_data, b_s, g, flow_local)
                return objective(b_s, log_q_s, (f_model, z_model, lq_model), (f_ref, z_ref, lq_ref), f_data,
                                 (z_data, lq_data), n_groups)

            val_g = torch.Generator(device=self.device)

            def validate(_):
                val_g.manual_seed(seed + 1)
                b_s, log_q_s = post.draw_global(1024, val_g)
                z_q, lq_q = self._draw_local(post, feats_obs, b_s, val_g, flow_local)
                glob_term, r = objective.elbo_terms(b_s, log_q_s, z_q, feats_obs, dict(post.critic.named_parameters()),
                                                    lq_q)
                return -float((glob_term + r.sum(1)).mean())

            groups = [
                {"params": list(post.q_global.parameters()) + list(post.generator.parameters())},
                {"params": list(post.critic.parameters()), "lr_scale": self.critic_lr_scale},
            ]
            summary = train({"posterior": post}, step, validate, n_groups, loop, seed=seed, progress=progress,
                            checkpoint=checkpoint, desc="LFVI", parameters=groups)
            summary["simulations"] = simulator.simulated
            post.training_summary = summary
        return post.attach_model(self.model, self.model_args, self.model_kwargs)

    @staticmethod
    def _draw_local(post: LFVIPosterior, feats, b_s, g, flow_local: bool):
        """q's local draws for the groups ``feats`` and, for a flow, their log-density (else None)."""
        return post.draw_local(feats, b_s, g, log_prob=True) if flow_local else (post.draw_local(feats, b_s, g), None)

    def _start_at_prior(self, post: LFVIPosterior, prior: _GlobalPrior, objective: "LFVIObjective",
                        batch: int = 256, particles: int = 64) -> None:
        """q(β) starts at the prior: ``prior_steps`` Adam steps on KL(p ‖ q) + KL(q ‖ p) of the
        global sites, the first by maximum likelihood on ``batch`` fresh prior draws (it spreads q
        over the prior's mass), the second on ``particles`` of q's own draws (it pulls in q's
        tails where the prior has none). No simulator runs. An untrained flow is a standard normal
        in the pilot-standardised coordinates, whose tails the prior may not have (log σ of σ ~ HalfNormal has a light right
        tail: a 4.7-sd normal draw is σ ≈ 16 where the prior puts none), and the simulator is run
        at every particle drawn — so do the ELBO's first steps."""
        if not self.prior_steps:
            return
        space, standardize = post.global_space, post.global_standardize
        draws = prior.sample(self.prior_steps * batch)
        b_p = standardize(space.to_unconstrained({k: v.to(self.device) for k, v in draws.items()}))
        # a float32 sampler can return a point of the support's boundary (σ = 0.0 from a HalfNormal,
        # once in ~10⁵ draws; probability zero in exact arithmetic): it has no unconstrained value
        # and is left out of this start, which only needs a Monte Carlo sample of the prior
        b_p = b_p[torch.isfinite(b_p).all(1)]
        generator = torch.Generator(device=self.device).manual_seed(fresh_seed())
        optimizer = torch.optim.Adam(post.q_global.parameters(), lr=1e-3)
        for chunk in b_p.split(batch):
            b_q, log_q = post.draw_global(particles, generator)
            loss = -objective.global_term(b_q, log_q).mean() - post.q_global().log_prob(chunk).mean()
            if not torch.isfinite(loss):
                raise TrainingError(f"LFVI: starting q(β) at the prior, the KL became {loss.item()}; check the "
                                    "global sites' priors for extreme values, or pass prior_steps=0")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    def _fit_standardizers(self, post: LFVIPosterior, data, seed: int, latent_names, obs, n_groups: int,
                           simulator: "_GroupSimulator") -> None:
        """Standardise x, z and β by ``data`` or a pilot simulation from the prior."""
        pilot = data
        if pilot is None:
            from ..simulate import simulate

            pilot = simulate(self.model, self.pilot_simulations, observed=self.observed, model_args=self.model_args,
                             model_kwargs=self.model_kwargs, seed=seed, device=self.device, progress=False)
        simulator.simulated += len(pilot) * n_groups
        missing = [k for k in latent_names + self.observed if k not in pilot.latent_names + pilot.observed_names]
        if missing:
            raise ValueError(f"data: the SimulationSet lacks the sites {missing}; was it simulated from this model?")
        p_x = torch.cat([pilot[k.name].reshape(len(pilot) * n_groups, -1) for k in obs], 1).to(self.device)
        post.x_standardize.fit(p_x.reshape((-1,) + post.x_group_shape))
        post.global_standardize.fit(post.global_space.to_unconstrained({k: pilot[k].to(self.device)
                                                                        for k in post.global_space.names}))
        post.local_standardize.fit(post.local_space.to_unconstrained(
            {k: pilot[k].to(self.device).reshape((-1,) + pilot[k].shape[2:]) for k in post.local_space.names}))


class _GroupSimulator:
    """Model draws of every group's local latents and data at given global particles; counts them."""

    def __init__(self, method: LFVI, post: LFVIPosterior, global_info, local, obs, outer_dim: int, n_groups: int):
        self.method, self.post, self.global_info = method, post, global_info
        self.local, self.obs, self.outer_dim, self.n_groups = local, obs, outer_dim, n_groups
        self.simulated = 0

    def __call__(self, b_s: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Standardised β ``(S, dg)`` → local u ``(S, N, dl)``, x ``(S, N, dx)``."""
        post, n, s = self.post, self.n_groups, b_s.shape[0]
        given = post.global_space.to_constrained(post.global_standardize.inverse(b_s))
        out = run_given(self.method.model, given, self.local + self.obs, self.outer_dim,
                        model_args=self.method.model_args, model_kwargs=self.method.model_kwargs, seed=seed,
                        device=self.method.device, latent_info=self.global_info)
        self.simulated += s * n
        z_u = post.local_space.to_unconstrained(
            {k.name: out[k.name].reshape((s * n,) + k.shape[1:]) for k in self.local}).reshape(s, n, -1)
        x = torch.cat([out[k.name].reshape(s, n, -1) for k in self.obs], -1)
        return z_u, x


class LFVIObjective:
    r"""LFVI's loss for one step, on S global particles β_s ~ q(β) and M groups:

        critic:     E_p softplus(−r) + E_ref softplus(r) on (x, z, β) from the model at β (label 1)
                    against (x', z' ~ q(z | x', β), β) with x' simulated at another particle;
        q(β), g:    −(1/N) [ log p(β) − log q(β) + (N/M) Σ_n r(x_n, z_n, β) ],  z_n ~ q(z | x_n, β),

    the second through a copy of the critic whose weights are detached, the first with its inputs
    detached; the two are summed so that one optimiser step updates both."""

    def __init__(self, post: LFVIPosterior, log_prior: _GlobalPrior):
        self.post, self.log_prior = post, log_prior
        self.critic_loss = RatioCriticLoss(self.logit)
        self.log_scale = post.global_standardize.scale.log().sum()

    def logit(self, feats: torch.Tensor, theta: torch.Tensor, log_q: torch.Tensor | None = None) -> torch.Tensor:
        """The critic's logit r = c(x, (z, β)) − log q(z | x, β): with a local flow the critic network c
        learns only log p(x, z | β) − log p̄(x), which does not move with q, and q's density enters
        exactly; with the implicit generator (``log_q`` None) the network is the whole ratio."""
        r = self.post.critic(feats, theta).reshape(-1)
        return r if log_q is None else r - log_q.reshape(-1)

    def elbo_terms(self, b_s, log_q_s, z_s, feats, critic_params, log_q_local=None) -> tuple[torch.Tensor, torch.Tensor]:
        """log p(β) − log q(β) ``(S,)`` and r(x_n, z_n, β) ``(S, M)`` for standardised β ``(S, dg)``,
        z ``(S, M, dl)`` and group features ``(M, dx)``, with the critic's ``critic_params`` (and q's local
        log-density ``log_q_local (S, M)`` for a local flow)."""
        post = self.post
        glob_term = self.global_term(b_s, log_q_s)
        s = b_s.shape[0]
        theta = torch.cat([z_s, b_s[:, None].expand(-1, z_s.shape[1], -1)], -1)
        r = functional_call(post.critic, critic_params, (feats[None].expand(s, -1, -1).reshape(-1, feats.shape[-1]),
                                                          theta.reshape(-1, theta.shape[-1]))).reshape(s, -1)
        return glob_term, r if log_q_local is None else r - log_q_local

    def global_term(self, b_s, log_q_s) -> torch.Tensor:
        """log p(β) − log q(β) ``(S,)`` at standardised β ``(S, dg)`` with q's density ``log_q_s`` there."""
        post = self.post
        b_u = post.global_standardize.inverse(b_s)
        log_p = self.log_prior(post.global_space.to_constrained(b_u)) + post.global_space.log_abs_det_jacobian(b_u)
        return log_p - (log_q_s - self.log_scale)

    def __call__(self, b_s, log_q_s, model_pairs, reference_pairs, f_data, data_draws, n_groups: int) -> dict:
        """``model_pairs`` / ``reference_pairs``: (features ``(S, M, dx)``, standardised z ``(S, M, dl)``,
        log q(z | x, β) ``(S, M)`` or None); ``f_data (M, dx)`` the observed groups' features and
        ``data_draws`` q's draws for them, (z ``(S, M, dl)``, their log q or None)."""
        s, m = model_pairs[1].shape[:2]
        bd = b_s.detach()[:, None].expand(-1, m, -1)

        def critic_inputs(f, z, log_q):
            return (f.reshape(s * m, -1), torch.cat([z, bd], -1).reshape(s * m, -1)) + (() if log_q is None else (log_q,))

        ratio_loss = self.critic_loss(critic_inputs(*model_pairs), critic_inputs(*reference_pairs))
        frozen = {k: v.detach() for k, v in self.post.critic.named_parameters()}
        glob_term, r = self.elbo_terms(b_s, log_q_s, data_draws[0], f_data, frozen, data_draws[1])
        elbo = glob_term + n_groups * r.mean(1)
        loss = ratio_loss - elbo.mean() / n_groups
        return {"loss": loss, "critic": ratio_loss.detach(), "elbo": elbo.mean().detach()}

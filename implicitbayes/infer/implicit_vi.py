r"""Implicit posterior by joint matching, corrected by a ratio-estimating critic
(Tran, Ranganath & Blei 2017; Pacchiardi & Dutta 2022; Turner et al. 2019).

Model joint p(θ, y) = π(θ) p(y | θ); generator joint q_w(θ, y) = q_w(θ | y) p(y) with the
implicit sampler θ̃ = f_w(e(y), z), z ~ N(0, I), on the same simulated y. Training has two stages,
in unconstrained, standardised coordinates of θ:

1. Generator: the energy score of m draws per simulated pair (a strictly proper scoring rule,
   so its minimiser over q is the posterior at every y),

       min_w  E_{p(θ, y)}[ ES_m(q_w(· | y), θ) ].

2. Critic: with f_w frozen, r_u(y, θ) is trained to convergence by logistic regression of
   simulated pairs (label 1) against generator pairs (label 0),

       min_u  E_p[softplus(−r_u)] + E_{q_w}[softplus(r_u)]   ⇒   r* = log p(θ | y)/q_w(θ | y)

   (both joints share p(y)). The critic sees θ both as it is and in the generator's own frame at
   y, (θ − m(y))/s(y), with m, s the mean and sd of f_w(y, ·) over fixed noise draws — a function
   of y, so r is still a function of (y, θ), and it resolves posteriors far narrower than the prior.

Every draw is then critic-corrected by sampling-importance-resampling: K candidates from q_w,
one kept with probability ∝ exp λ r (:class:`~implicitbayes.infer.sir.CriticResampler`, whose
docstring has the math), λ chosen after training by the held-out log score of that sampler. No
density of q_w is ever evaluated. ``correction=None`` returns the generator's own draws.

With ``distill=True`` an ODE-sampled generator (flow matching, score) is followed by stage 1b: a
one-step network regressed on the ODE's flow map at the same noise (whose minimiser is that map,
so its draws keep the ODE's distribution), and the critic corrects the one-step network.

Defaults — K = 8 candidates, max(2 dim θ, 8) noise coordinates, patience 60 with the learning rate
halved on every plateau of 10 validations, the linear path from noise to output below 2 500
simulations per latent dimension — are the settings that won in
``benchmarks/results/implicit_vi_ablation.md``, which records each decision and its evidence.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ..checks import choice, flag, integer
from ..nn import ConsistencyGenerator, Critic, DistilledGenerator, FlowMatchingGenerator, ImplicitGenerator, ScoreGenerator
from ..seeding import seeded
from ..space import ParameterSpace
from ..simulate import sharing_trial_runs
from .method import NeuralMethod, network_builder
from .objectives import EnergyScoreLoss, RatioCriticLoss
from .posterior import NeuralConfig, NeuralPosterior, build_network, neural_config_fields, register_posterior
from .sir import CriticResampler
from .training import TrainConfig, resolve_training, split, train

__all__ = ["ImplicitVI", "ImplicitPosterior", "ImplicitVIConfig", "NOISE_SKIP_BELOW", "FAMILIES"]

# the generator families: the energy-score MLP (ImplicitGenerator), and two continuous-time ones
# trained by their own regression losses, the flow map of an ODE learned by flow matching
# (FlowMatchingGenerator), a score-based diffusion sampled by its probability-flow ODE
# (ScoreGenerator) and a one-step consistency model (ConsistencyGenerator); implicitbayes.nn.generators
# has the math
FAMILIES = ("energy_score", "flow_matching", "score", "consistency")
CONTINUOUS = {"flow_matching": FlowMatchingGenerator, "score": ScoreGenerator, "consistency": ConsistencyGenerator}
# the families sampled by an ODE, a deterministic map of the noise that a one-step network can learn (distill=True)
ODE_FAMILIES = ("flow_matching", "score")

# noise_skip=None turns the linear noise path on below this many simulations per latent
# dimension: it pools the posterior's shape over every simulation, which pays where they are
# scarce, while its Gaussian bias costs more where they are plentiful (implicit_vi_ablation.md).
NOISE_SKIP_BELOW = 2500


@dataclass
class ImplicitVIConfig(NeuralConfig):
    """The networks and the sampler of an :class:`ImplicitPosterior`."""

    generator: str  # "mlp" (ImplicitGenerator of the sizes below) or "custom" (a build callable)
    critic: str  # "mlp" (Critic of the sizes below) or "custom"
    hidden: int
    layers: int
    noise_features: int
    noise_skip: bool
    critic_hidden: int
    critic_layers: int
    correction: str | None
    num_candidates: int
    temperature: float = 1.0  # λ, chosen after training (CriticResampler.select_temperature)
    family: str = "energy_score"  # the generator's family (FAMILIES)
    distilled: bool = False  # the ODE sampler distilled into a one-step network (DistilledGenerator)


@register_posterior
class ImplicitPosterior(NeuralPosterior):
    """An implicit posterior f_w(e(y), z) whose draws a critic corrects (SIR)."""

    method = "implicit_vi"
    Config = ImplicitVIConfig
    FRAME_DRAWS = 64  # noise draws that define the critic's local frame at y
    ODE_FRAME_DRAWS = 16  # the same for an ODE sampler, whose every draw costs tens of field evaluations
    FRAME_FLOOR = 1e-6

    def __init__(self, space: ParameterSpace, observed, x_shapes, config: ImplicitVIConfig,
                 embedding: nn.Module | None = None, generator: Callable[[int, int, int], nn.Module] | None = None,
                 critic: Callable[[int, int], nn.Module] | None = None):
        super().__init__(space, observed, x_shapes, config, embedding)
        d, e = space.unconstrained_dim, self.context.out_features
        if config.family in CONTINUOUS:
            def default():
                return CONTINUOUS[config.family](e, d, config.hidden, config.layers)
        else:
            def default():
                return ImplicitGenerator(e, d, config.noise_features, config.hidden, config.layers,
                                         noise_skip=config.noise_skip)
        self.generator = build_network("generator", config.generator == "custom", generator, default,
                                       e, d, config.noise_features)
        if config.distilled:  # the student is twice as wide as the field it replaces: one evaluation does the ODE's work
            self.generator = DistilledGenerator(self.generator, ImplicitGenerator(
                e, d, config.noise_features, 2 * config.hidden, config.layers, noise_skip=True))
        self.critic = build_network("critic", config.critic == "custom", critic, lambda: Critic(
            2 * d, e, config.critic_hidden, config.critic_layers), 2 * d, e)
        self.last_ess: float | None = None
        # fixed noise of the critic's local frame, so that the frame is a function of y (saved with the weights)
        g = torch.Generator().manual_seed(0)
        m = self.ODE_FRAME_DRAWS if self.ode_sampler else self.FRAME_DRAWS
        self.register_buffer("frame_noise", torch.randn((m, config.noise_features), generator=g))

    @property
    def ode_sampler(self) -> bool:
        """Whether a draw is an ODE solve (flow matching or score, not distilled): 2 · steps field evaluations."""
        return self.config.family in ODE_FAMILIES and not self.config.distilled

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a file saved with another number of frame draws keeps its own: its critic learned in that frame
        saved = state_dict.get(prefix + "frame_noise")
        if saved is not None and saved.dim() == 2 and saved.shape[1] == self.frame_noise.shape[1]:
            self.frame_noise = self.frame_noise.new_empty(saved.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def draw_standardized(self, c: torch.Tensor, m: int, generator: torch.Generator) -> torch.Tensor:
        """``m`` generator draws ``(n, m, d)`` in standardised coordinates for contexts ``c (n, e)``."""
        noise = torch.randn((c.shape[0], m, self.config.noise_features), generator=generator,
                            device=c.device, dtype=c.dtype)
        return self.generator(c, noise)

    def critic_frame(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The local frame (loc, scale), each ``(n, d)``, in which the critic also sees θ for the
        contexts ``c (n, e)``: mean and sd of the generator's draws at y from fixed noise."""
        draws = self.generator(c, self.frame_noise.expand(c.shape[0], -1, -1))  # (n, M, d)
        return draws.mean(1), draws.std(1) + self.FRAME_FLOOR

    def log_ratio(self, c: torch.Tensor, u: torch.Tensor,
                  frame: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The critic's log p(θ | y)/q_w(θ | y) at standardised ``u (n, [m,] d)`` for contexts
        ``c (n, e)``: ``(n, [m])``. ``frame`` is ``critic_frame(c)`` when already computed."""
        loc, scale = self.critic_frame(c) if frame is None else frame
        if u.dim() == 3:
            loc, scale = loc[:, None], scale[:, None]
        return self.critic(c, torch.cat([u, (u - loc) / scale], -1))

    def _sample_unconstrained(self, x, num_samples, generator, correction: str | None = "default",
                              num_candidates: int | None = None):
        correction = choice("correction", correction, ("default", "sir", None))
        correction = self.config.correction if correction == "default" else correction
        k = integer("num_candidates", num_candidates, none=True) or self.config.num_candidates
        c = self.context(x)  # (1, e)

        def propose(m: int) -> torch.Tensor:
            return self.draw_standardized(c, m, generator)[0]

        if correction is None:
            u_s, self.last_ess = propose(num_samples), None
        else:
            frame = self.critic_frame(c)

            def log_ratio(cand: torch.Tensor) -> torch.Tensor:
                n = cand.shape[0]
                return self.log_ratio(c.expand(n, -1), cand, (frame[0].expand(n, -1), frame[1].expand(n, -1)))

            sir = CriticResampler(k, self.config.temperature)
            u_s, self.last_ess = sir.sample(propose, log_ratio, num_samples, generator)
        return self.theta_standardize.inverse(u_s)

    def sample(self, num_samples: int, observed: Any = None, *, seed: int | None = None,
               correction: str | None = "default", num_candidates: int | None = None) -> dict[str, torch.Tensor]:
        """Posterior draws ``{site: (num_samples, *shape)}``. ``correction="sir"`` (the default
        when trained with it) resamples ``num_candidates`` generator draws by the critic's ratio,
        ``correction=None`` returns the generator's own draws. ``self.last_ess`` is then the mean
        effective number of candidates per draw (near K: the generator already matches)."""
        return super().sample(num_samples, observed, seed=seed, correction=correction, num_candidates=num_candidates)


class _Contexts:
    """e(y) of every training row, with the critic's local frame, for the critic stage (embedding
    and generator are frozen then): computed once and kept when they take at most
    ``CACHE_BYTES``, else recomputed per minibatch, so a memory-mapped set is never held whole.
    ``contexts[idx]`` is ``(c, frame)``.

    With ``pool`` > 0 (an ODE sampler, whose every draw costs tens of evaluations of its field) the
    cache also keeps ``pool`` generator draws per row from fresh noise, and the critic's fakes are
    taken from them instead of drawn anew at every step (:meth:`fakes`)."""

    CACHE_BYTES = 512 * 2**20

    def __init__(self, post: ImplicitPosterior, x, pool: int = 0, generator: torch.Generator | None = None):
        self.post, self.x = post, x
        self.cache = self.pool = None
        d = post.space.unconstrained_dim
        width = post.context.out_features + (2 + pool) * d
        if len(x) * width * 4 <= self.CACHE_BYTES:
            parts = [self._compute(i) for i in torch.arange(len(x)).split(4096)]
            c = torch.cat([p[0] for p in parts])
            frame = tuple(torch.cat([p[1][j] for p in parts]) for j in (0, 1))
            self.cache = (c, frame)
            if pool:
                with torch.no_grad():
                    self.pool = torch.cat([post.draw_standardized(ci, pool, generator) for ci in c.split(1024)])

    @torch.no_grad()
    def _compute(self, idx: torch.Tensor):
        c = self.post.context(self.x[idx])
        return c, self.post.critic_frame(c)

    def __getitem__(self, idx: torch.Tensor):
        if self.cache is None:
            return self._compute(idx)
        c, frame = self.cache
        return c[idx], (frame[0][idx], frame[1][idx])

    @torch.no_grad()
    def fakes(self, idx: torch.Tensor, c: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One generator draw ``(n, 1, d)`` for each row ``idx`` (contexts ``c``): a pooled draw
        chosen by ``generator``, or a fresh one where there is no pool."""
        if self.pool is None:
            return self.post.draw_standardized(c, 1, generator)
        col = torch.randint(self.pool.shape[1], idx.shape, generator=generator, device=generator.device)
        return self.pool[idx.to(self.pool.device), col.to(self.pool.device)][:, None]


class ImplicitVI(NeuralMethod):
    """Amortized implicit posterior corrected by a ratio-estimating critic (module docstring).

    Options: the sampler, ``correction`` ("sir" or None) and ``num_candidates`` K; the generator's
    ``family`` — ``"energy_score"`` (an MLP of (e(y), z) trained by the energy score of
    ``num_draws`` m draws per observation), ``"flow_matching"`` (the flow map of a learned ODE,
    :class:`~implicitbayes.nn.FlowMatchingGenerator`, trained by flow matching; with
    ``correction=None`` it is plain flow-matching posterior estimation), ``"score"`` (a
    score-based diffusion sampled by its probability-flow ODE,
    :class:`~implicitbayes.nn.ScoreGenerator`) or ``"consistency"`` (a one-step consistency model,
    :class:`~implicitbayes.nn.ConsistencyGenerator`, by consistency training over
    ``training.max_steps``, validated by the energy score of its draws); ``distill`` (flow matching
    and score only): after the ODE sampler is trained, regress a one-step network, twice as wide, on
    its flow map at the same noise and draw from that
    (:class:`~implicitbayes.nn.DistilledGenerator`; the critic then corrects the one-step network,
    and a draw costs one evaluation instead of the ODE's 2 · steps); the networks, ``hidden``, ``layers``,
    ``noise_features`` (None: max(2 dim θ, 8)) and ``noise_skip`` (a linear path from the noise to
    the output, f_w = g(e(y), z) + A z; None: on below ``NOISE_SKIP_BELOW`` simulations per latent
    dimension) of the generator, ``critic_hidden``, ``critic_layers`` of the critic — or build
    callables in their place, ``generator(context_features, theta_features, noise_features)``
    returning a module ``(context (n, e), noise (n, m, k)) -> (n, m, d)`` (e.g.
    ``partial(ib.nn.ImplicitGenerator, noise_injection="multiplicative")``) and
    ``critic(theta_features, context_features)`` returning a module ``(context, θ) -> r`` (e.g.
    ``partial(ib.nn.Critic, kind="projection")``; θ has 2 dim θ features: as simulated and in
    the generator's frame), passed again to ``ib.load`` — and ``embedding`` of the observation;
    the loops, ``training`` (the generator's, default ``ImplicitVI.TRAINING``, for the
    continuous-time families ``ImplicitVI.CONTINUOUS_TRAINING``), ``distill_training`` (the one-step
    network's, ``ImplicitVI.DISTILL_TRAINING``) and
    ``critic_training`` (the critic's, ``ImplicitVI.CRITIC_TRAINING``), each a
    :class:`~implicitbayes.TrainConfig` or a mapping of its fields to change; ``device``.
    """

    TRAINING = TrainConfig(batch_size=128, lr=1e-3, max_steps=20_000, patience=60, plateau=10, validate_every=50)
    # the continuous-time families regress a field: a step is cheap and the loss falls slowly under
    # its own noise, which the plateau halving above mistakes for a plateau (gaussian_mixture 10^4:
    # stopped at 8 800 steps with the rate down 2^9, raw draws 0.747; these settings 0.634 —
    # implicit_vi_ablation.md)
    CONTINUOUS_TRAINING = TrainConfig(batch_size=256, lr=1e-3, max_steps=60_000, patience=100, validate_every=50)
    CRITIC_TRAINING = TrainConfig(batch_size=512, lr=1e-3, max_steps=10_000, patience=20, validate_every=50)
    DISTILL_TRAINING = TrainConfig(batch_size=512, lr=1e-3, max_steps=30_000, patience=100, validate_every=100)
    # teacher draws the student is regressed on: DISTILL_PAIRS in all, at most DISTILL_DRAWS per simulated y
    DISTILL_PAIRS, DISTILL_DRAWS = 320_000, 32
    TEMPERATURES = CriticResampler.TEMPERATURES
    SELECTION_DRAWS = 256  # proposal draws per held-out observation when choosing λ
    # ... for an ODE sampler: the same λ at a quarter of the solves (implicit_vi_ablation.md)
    ODE_SELECTION_DRAWS = 64
    # generator draws per training row kept for the critic of an ODE sampler (drawn once: a draw
    # costs 2 · steps field evaluations, fresh ones at every critic step cost more than the field's training)
    CRITIC_POOL = 16

    def __init__(self, model: Callable, *, observed: str | Sequence[str], model_args: tuple = (),
                 model_kwargs: Mapping | None = None, correction: str | None = "sir", num_candidates: int = 8,
                 family: str = "energy_score", distill: bool = False, num_draws: int = 8, hidden: int = 128, layers: int = 4, noise_features: int | None = None,
                 noise_skip: bool | None = None, critic_hidden: int = 128, critic_layers: int = 4,
                 generator: Callable[[int, int, int], nn.Module] | None = None,
                 critic: Callable[[int, int], nn.Module] | None = None,
                 embedding: nn.Module | None = None, training: TrainConfig | Mapping | None = None,
                 critic_training: TrainConfig | Mapping | None = None,
                 distill_training: TrainConfig | Mapping | None = None, device: str | torch.device | None = None):
        super().__init__(model, observed=observed, model_args=model_args, model_kwargs=model_kwargs,
                         embedding=embedding, training=training, device=device)
        self.critic_training = resolve_training(self.CRITIC_TRAINING, critic_training, "critic_training")
        self.correction = choice("correction", correction, ("sir", None))
        self.num_candidates = integer("num_candidates", num_candidates)
        self.num_draws = integer("num_draws", num_draws, minimum=2)  # the energy score needs two draws
        self.family = choice("family", family, FAMILIES)
        self.distill = flag("distill", distill)
        if self.distill and self.family not in ODE_FAMILIES:
            raise ValueError(f"distill: a one-step network learns an ODE sampler's map of the noise, which the "
                             f"families {list(ODE_FAMILIES)} have; family={self.family!r} draws in one step already")
        if distill_training is not None and not self.distill:
            raise ValueError("distill_training: the one-step network's loop, which only distill=True trains; "
                             f"got {distill_training!r} with distill=False")
        self.distill_training = resolve_training(self.DISTILL_TRAINING, distill_training, "distill_training")
        if self.family in CONTINUOUS:
            self.training = resolve_training(self.CONTINUOUS_TRAINING, training)
            for name, value in (("noise_features", noise_features), ("noise_skip", noise_skip)):
                if value is not None:
                    raise ValueError(f"{name}: a continuous-time generator's noise is the latent's own dimension "
                                     f"and has no noise path; leave {name}=None with family={self.family!r}")
        if noise_skip is not None and not isinstance(noise_skip, bool):
            raise ValueError(f"noise_skip: expected True, False or None (on below {NOISE_SKIP_BELOW} simulations "
                             f"per latent dimension), got {noise_skip!r}")
        self.noise_skip = noise_skip
        self.hidden, self.layers = integer("hidden", hidden), integer("layers", layers)
        self.noise_features = integer("noise_features", noise_features, none=True)
        self.critic_hidden = integer("critic_hidden", critic_hidden)
        self.critic_layers = integer("critic_layers", critic_layers)
        self.generator = network_builder("generator", generator, {
            "hidden": (hidden, 128), "layers": (layers, 4), "noise_skip": (noise_skip, None)})
        self.critic = network_builder("critic", critic, {"critic_hidden": (critic_hidden, 128),
                                                         "critic_layers": (critic_layers, 4)})

    def _posterior_config(self, x_shape, d: int) -> ImplicitVIConfig:
        n, flow = x_shape[0], self.family in CONTINUOUS
        return ImplicitVIConfig(
            **neural_config_fields(x_shape[1:], self.embedding),
            generator="mlp" if self.generator is None else "custom", critic="mlp" if self.critic is None else "custom",
            hidden=self.hidden, layers=self.layers,
            noise_features=d if flow else self.noise_features or max(2 * d, 8),
            noise_skip=False if flow else bool(self.noise_skip) if self.noise_skip is not None else n < NOISE_SKIP_BELOW * d,
            critic_hidden=self.critic_hidden, critic_layers=self.critic_layers, correction=self.correction,
            num_candidates=self.num_candidates, family=self.family, distilled=self.distill)

    @sharing_trial_runs
    def fit(self, data, *, max_steps: int | None = None, time_budget: float | None = None, seed: int | None = None,
            progress: bool = True, checkpoint=None, init: ImplicitPosterior | None = None) -> ImplicitPosterior:
        """Train on a SimulationSet; returns an :class:`ImplicitPosterior`. ``init``: start from
        that posterior's networks, standardisations and configuration (a warm start).

        ``max_steps`` and ``time_budget`` apply to each stage; ``checkpoint`` is a path prefix
        (``<checkpoint>.generator``, ``<checkpoint>.student`` and ``<checkpoint>.critic`` are written).
        """
        prep, seed, loop = self._begin(data, max_steps, time_budget, seed)
        critic_loop = self.critic_training.with_fit(max_steps, time_budget)
        config = init.config if init is not None else self._posterior_config(prep.x.shape, prep.space.unconstrained_dim)
        with seeded(seed, self.device):
            post = ImplicitPosterior(prep.space, prep.observed, prep.x_shapes, config, self.embedding, self.generator,
                                     self.critic).to(self.device)
            x = prep.x_on(self.device)
            u_s = post.fit_standardizers(prep.x, prep.u.to(self.device))
            if init is not None:
                self._warm_start(post, init)
                u_s = post.theta_standardize(prep.u.to(self.device))
            summary = {"generator": self._fit_generator(post, x, u_s, loop, seed, progress, checkpoint)}
            if post.config.distilled:
                summary["distillation"] = self._distill(post, x, self.distill_training.with_fit(max_steps, time_budget),
                                                        seed, progress, checkpoint)
            if self.correction == "sir":
                summary.update(self._fit_critic(post, x, u_s, critic_loop, seed, progress, checkpoint))
            post.training_summary = summary
        return post.attach_model(self.model, self.model_args, self.model_kwargs)

    def _fit_generator(self, post: ImplicitPosterior, x, u_s, loop: TrainConfig, seed: int, progress: bool,
                       checkpoint) -> dict:
        """Stage 1: the energy score of ``num_draws`` generator draws per simulated pair, or the
        generator's own regression loss (``generator.loss(context, u, g)``, flow matching)."""
        if post.config.family in CONTINUOUS:
            if not callable(getattr(post.generator, "loss", None)):
                raise TypeError(f"generator: family={post.config.family!r} trains the generator by its own "
                                f"loss(context, theta, generator) method, which {type(post.generator).__name__} "
                                "does not have")

            def score(x, u, g):
                return post.generator.loss(post.context(x), u, g)
        else:
            score = EnergyScoreLoss(post, self.num_draws)
        # the consistency loss falls as its grid refines, whatever the fit: its draws are validated by
        # the energy score (a proper scoring rule of the draws, the same for every stage of the curriculum)
        check = EnergyScoreLoss(post, self.num_draws) if post.config.family == "consistency" else score
        if post.config.family == "consistency":
            post.generator.total_steps = loop.max_steps
        val_g = torch.Generator(device=self.device)

        def step(idx, g):
            return {"loss": score(x[idx], u_s[idx], g).mean()}

        def validate(idx):
            val_g.manual_seed(seed + 1)
            return float(sum(check(x[i], u_s[i], val_g).sum() for i in idx.split(2048)) / len(idx))

        return train({"context": post.context, "generator": post.generator}, step, validate, len(x), loop, seed=seed,
                     progress=progress, checkpoint=None if checkpoint is None else f"{checkpoint}.generator",
                     desc="ImplicitVI generator",
                     parameters=list(post.context.parameters()) + list(post.generator.parameters()))

    def _distill(self, post: ImplicitPosterior, x, loop: TrainConfig, seed: int, progress: bool, checkpoint) -> dict:
        """Stage 1b: the one-step student regressed on the trained ODE sampler's draws from fixed
        noise, ``m`` per simulated y (``DISTILL_PAIRS`` in all, at most ``DISTILL_DRAWS`` each), one
        pair per row in every minibatch; e(y) stays as the teacher's stage left it."""
        gen, n = post.generator, len(x)
        m = max(1, min(self.DISTILL_DRAWS, self.DISTILL_PAIRS // n))
        g = torch.Generator(device=self.device).manual_seed(seed + 4)
        with torch.no_grad():
            c = torch.cat([post.context(x[i]) for i in torch.arange(n).split(4096)])
            z = torch.randn((n, m, post.config.noise_features), generator=g, device=c.device, dtype=c.dtype)
            target = torch.cat([gen.teacher(ci, zi) for ci, zi in zip(c.split(1024), z.split(1024))])

        def step(idx, g):
            idx = idx.to(c.device)
            col = torch.randint(m, idx.shape, generator=g, device=g.device)
            return {"loss": gen.distillation_loss(c[idx], z[idx, col][:, None], target[idx, col][:, None]).mean()}

        def validate(idx):
            idx = idx.to(c.device)
            return float(sum(gen.distillation_loss(c[i], z[i], target[i]).sum() for i in idx.split(1024)) / (len(idx) * m))

        return train({"student": gen.student}, step, validate, n, loop, seed=seed + 4, progress=progress,
                     checkpoint=None if checkpoint is None else f"{checkpoint}.student", desc="ImplicitVI one-step student")

    def _fit_critic(self, post: ImplicitPosterior, x, u_s, loop: TrainConfig, seed: int, progress: bool,
                    checkpoint) -> dict:
        """Stage 2: the ratio critic against the frozen generator, then the SIR strength λ."""
        frozen = list(post.context.parameters()) + list(post.generator.parameters())
        for p in frozen:
            p.requires_grad_(False)
        contexts = _Contexts(post, x, self.CRITIC_POOL if post.ode_sampler else 0,
                             torch.Generator(device=self.device).manual_seed(seed + 5))
        critic_loss = RatioCriticLoss(post.log_ratio)
        val_g = torch.Generator(device=self.device)

        def loss(idx, g):
            c, frame = contexts[idx]
            fake = contexts.fakes(idx, c, g)  # one generator draw per y
            return critic_loss((c, u_s[idx], frame), (c, fake, frame))

        def step(idx, g):
            return {"ratio_loss": loss(idx, g)}

        def validate(idx):
            val_g.manual_seed(seed + 2)
            return sum(float(loss(i, val_g)) * len(i) for i in idx.split(4096)) / len(idx)

        summary = train({"critic": post.critic}, step, validate, len(x), loop, seed=seed + 1, progress=progress,
                        checkpoint=None if checkpoint is None else f"{checkpoint}.critic", desc="ImplicitVI critic")
        for p in frozen:
            p.requires_grad_(True)
        scores = self._select_temperature(post, contexts, u_s, loop, seed)
        post.config = replace(post.config, temperature=min(scores, key=scores.get))
        return {"critic": summary, "critic_pool": 0 if contexts.pool is None else contexts.pool.shape[1],
                "correction_selection": scores}

    @torch.no_grad()
    def _select_temperature(self, post: ImplicitPosterior, contexts: _Contexts, u_s, loop: TrainConfig,
                            seed: int) -> dict[float, float]:
        """The held-out log score of SIR with K candidates for each λ
        (:meth:`CriticResampler.select_temperature`), on rows the critic was not fitted to."""
        k = post.config.num_candidates
        if k == 1:
            return CriticResampler.select_temperature(torch.zeros(0), torch.zeros(0, 1, 0), 1)
        _, val_idx = split(len(u_s), loop.validation_fraction, torch.Generator().manual_seed(seed + 1))
        idx = val_idx[:1024].to(u_s.device)
        g = torch.Generator(device=u_s.device).manual_seed(seed + 3)
        groups = max(1, (self.ODE_SELECTION_DRAWS if post.ode_sampler else self.SELECTION_DRAWS) // (k - 1))
        c, frame = contexts[idx]
        r_true = post.log_ratio(c, u_s[idx], frame)  # (n,)
        # groups · (K − 1) generator draws per held-out observation, 64 observations at a time
        r_gen = torch.cat([post.log_ratio(c[i], post.draw_standardized(c[i], groups * (k - 1), g),
                                          (frame[0][i], frame[1][i]))
                           for i in torch.arange(len(idx), device=c.device).split(64)])
        return CriticResampler.select_temperature(r_true, r_gen.reshape(len(idx), groups, k - 1), k)

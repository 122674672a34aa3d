r"""Implicit generators θ = f_w(e(y), z), z ~ N(0, I): conditional samplers with no density.

Two families, one interface ``forward(context (n, e), noise (n, m, k)) -> (n, m, d)``:

* :class:`ImplicitGenerator`, an MLP of (e(y), z) trained by a scoring rule of its draws (the
  energy score in :class:`~implicitbayes.ImplicitVI`). Noise enters at the input (``"concat"``),
  multiplicatively at every hidden layer as in GATSBI, h ← h + (W_l z) ⊙ h
  (``"multiplicative"``), or both.
* :class:`FlowMatchingGenerator`, the flow map of a learned ODE (flow matching; Lipman et al.
  2023, FMPE of Wildberger et al. 2023): f_w(e(y), z) = θ(1) for dθ/dt = v_w(θ, t, e(y)),
  θ(0) = z. Trained by regressing v_w on the straight path from noise to a simulated θ
  (:meth:`FlowMatchingGenerator.loss`); no density of q_w is evaluated, in training or after.
* :class:`ScoreGenerator`, a score-based diffusion (Song et al. 2021) trained by denoising score
  matching and sampled by its probability-flow ODE, again a deterministic map of z.
* :class:`ConsistencyGenerator`, a consistency model (Song et al. 2023): the map from any point of
  a noising trajectory to its start, learned by consistency training with no teacher, so that one
  network evaluation turns noise into a draw.
* :class:`DistilledGenerator`, an ODE sampler (flow matching or score) and a one-step MLP
  regressed on its flow map at the same noise (knowledge distillation; Luhman & Luhman 2021):
  the ODE's accuracy at the cost of one network evaluation per draw.

The output is a point in the unconstrained space of the latents; a
:class:`~implicitbayes.ParameterSpace` maps it onto each site's support (so a bounded prior
never yields out-of-support draws).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..space import ParameterSpace

__all__ = ["ImplicitGenerator", "FlowMatchingGenerator", "ScoreGenerator", "ConsistencyGenerator", "DistilledGenerator",
           "TimeConditionedMLP", "integrate_midpoint"]


class ImplicitGenerator(nn.Module):
    """Conditional implicit sampler: ``forward(context (n, c), noise (n, m, k)) -> (n, m, D_u)``.

    Args:
        context_features: size of the embedded observation e(y).
        theta_features: size of the *unconstrained* latent vector (``space.unconstrained_dim``).
        noise_features: size of z (default: ``max(theta_features, 2)``).
        hidden, layers: width and depth of the MLP.
        noise_injection: ``"concat"``, ``"multiplicative"`` or ``"both"``.
        noise_skip: add a linear path from the noise to the output, θ = g(c, z) + A z. A
            Gaussian with a shape shared across contexts is then exactly representable by the
            linear part (A pooled over every context), and the MLP g learns the departures
            from it. A starts at zero.
        space: optional ParameterSpace; :meth:`sample` then returns constrained flat vectors.
    """

    def __init__(self, context_features: int, theta_features: int, noise_features: int | None = None,
                 hidden: int = 256, layers: int = 4, noise_injection: str = "concat",
                 space: ParameterSpace | None = None, activation: type[nn.Module] = nn.SiLU, noise_skip: bool = False):
        super().__init__()
        if noise_injection not in ("concat", "multiplicative", "both"):
            raise ValueError(f"noise_injection: expected 'concat', 'multiplicative' or 'both', got {noise_injection!r}")
        if not isinstance(noise_skip, bool):
            raise ValueError(f"noise_skip: expected True or False, got {noise_skip!r}")
        if space is not None and space.unconstrained_dim != theta_features:
            raise ValueError(f"theta_features={theta_features} but the space has {space.unconstrained_dim} "
                             "unconstrained dimensions")
        self.context_features, self.theta_features = context_features, theta_features
        self.noise_features = noise_features or max(theta_features, 2)
        self.noise_injection, self.space = noise_injection, space
        concat = noise_injection in ("concat", "both")
        self.inp = nn.Linear(context_features + (self.noise_features if concat else 0), hidden)
        self.hidden = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers - 1))
        self.inject = (nn.ModuleList(nn.Linear(self.noise_features, hidden, bias=False) for _ in range(layers))
                       if noise_injection in ("multiplicative", "both") else None)
        self.act = activation()
        self.out = nn.Linear(hidden, theta_features)
        self.skip = nn.Linear(self.noise_features, theta_features, bias=False) if noise_skip else None
        if self.skip is not None:  # starts as the MLP alone; A grows where the data ask for it
            nn.init.zeros_(self.skip.weight)

    def forward(self, context: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Unconstrained draws ``(n, m, theta_features)`` for ``m`` noise vectors per context row."""
        if noise.dim() != 3 or noise.shape[0] != context.shape[0] or noise.shape[-1] != self.noise_features:
            raise ValueError(f"noise: expected shape ({context.shape[0]}, m, {self.noise_features}), got {tuple(noise.shape)}")
        c = context[:, None].expand(-1, noise.shape[1], -1)
        h = self.inp(torch.cat([c, noise], -1) if self.noise_injection != "multiplicative" else c)
        for i, layer in enumerate([None, *self.hidden]):
            if layer is not None:
                h = layer(h)
            if self.inject is not None:
                h = h + self.inject[i](noise) * h
            h = self.act(h)
        return self.out(h) if self.skip is None else self.out(h) + self.skip(noise)

    def sample(self, context: torch.Tensor, num_samples: int, generator: torch.Generator | None = None,
               constrained: bool = True) -> torch.Tensor:
        """``num_samples`` draws per context row, in one batched call: ``(n, m, D)``.

        With a ``space`` and ``constrained=True`` the draws are mapped onto the latents'
        supports (``D = space.dim``); otherwise they are unconstrained (``D = theta_features``).
        """
        noise = torch.randn((context.shape[0], num_samples, self.noise_features), generator=generator,
                            device=context.device, dtype=context.dtype)
        u = self(context, noise)
        if self.space is None or not constrained:
            return u
        n, m = u.shape[:2]
        return self.space.flatten(self.space.to_constrained(u.reshape(n * m, -1))).reshape(n, m, -1)


def _positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return value


class TimeConditionedMLP(nn.Module):
    """net(θ (..., d), t (...) or a number, context (..., e)) -> (..., d): an MLP of θ, e(y), t and
    sinusoidal features of t (frequencies π, 2π, 4π, …) — the field of the continuous-time
    generators."""

    def __init__(self, context_features: int, theta_features: int, hidden: int = 128, layers: int = 4,
                 time_features: int = 8, activation: type[nn.Module] = nn.SiLU):
        super().__init__()
        for name, value in (("hidden", hidden), ("layers", layers), ("time_features", time_features)):
            _positive(name, value)
        self.register_buffer("frequencies", math.pi * 2.0 ** torch.arange(time_features // 2, dtype=torch.float32))
        width = theta_features + context_features + 1 + 2 * (time_features // 2)
        dims = [width] + [hidden] * layers
        self.body = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.act = activation()
        self.out = nn.Linear(hidden, theta_features)

    def forward(self, theta: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=theta.dtype, device=theta.device).expand(theta.shape[:-1])[..., None]
        angles = t * self.frequencies
        h = torch.cat([theta, context.expand(theta.shape[:-1] + context.shape[-1:]), t, angles.sin(), angles.cos()], -1)
        for layer in self.body:
            h = self.act(layer(h))
        return self.out(h)


def integrate_midpoint(field, theta: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
    """θ at ``times[-1]`` for dθ/dt = field(θ, t) from θ at ``times[0]``: one explicit midpoint step
    per interval of ``times`` (increasing or decreasing)."""
    for a, b in zip(times[:-1].tolist(), times[1:].tolist()):
        h = b - a
        half = theta + 0.5 * h * field(theta, a)
        theta = theta + h * field(half, a + 0.5 * h)
    return theta


def _check_noise(context: torch.Tensor, noise: torch.Tensor, features: int) -> torch.Tensor:
    if noise.dim() != 3 or noise.shape[0] != context.shape[0] or noise.shape[-1] != features:
        raise ValueError(f"noise: expected shape ({context.shape[0]}, m, {features}), got {tuple(noise.shape)}")
    return context[:, None].expand(-1, noise.shape[1], -1)


class FlowMatchingGenerator(nn.Module):
    r"""θ = f_w(e(y), z): the flow map of dθ/dt = v_w(θ, t, e(y)) from θ(0) = z ~ N(0, I) to t = 1.

    Conditional flow matching (Lipman et al. 2023) on the path θ_t = (1 − (1 − σ) t) z + t θ
    between noise z and a simulated θ, whose velocity is u = θ − (1 − σ) z: v_w minimises

        E_{t ~ U(0, 1), (θ, y) ~ p, z ~ N(0, I)} ‖v_w(θ_t, t, e(y)) − u‖²,

    whose minimiser's flow carries N(0, I) to p(θ | y) at every y (σ = ``sigma_min``, the width
    the path keeps at t = 1). Sampling integrates the ODE with ``steps`` fixed midpoint steps
    (two evaluations of v_w each) on the grid t_k = 1 − (1 − k/steps)^p, p = ``grid_power``: the
    field of a posterior of width s in standardised units changes on a time scale s near t = 1
    (its Jacobian there is of order 1/s), so the steps shrink towards the data end, where an
    explicit step longer than about 2 s would amplify the field's errors rather than damp them.
    The noise has the latent's dimension.

    Args:
        context_features: size of e(y). theta_features: size of the unconstrained latent.
        hidden, layers, time_features: the field (:class:`TimeConditionedMLP`).
        steps: midpoint steps of the sampler. grid_power: p of the time grid (1: uniform).
        sigma_min: the path's width at t = 1.
    """

    def __init__(self, context_features: int, theta_features: int, hidden: int = 128, layers: int = 4,
                 steps: int = 8, time_features: int = 8, sigma_min: float = 1e-4, grid_power: float = 2.0,
                 activation: type[nn.Module] = nn.SiLU):
        super().__init__()
        self.steps = _positive("steps", steps)
        if not 0 <= sigma_min < 1:
            raise ValueError(f"sigma_min: expected a number in [0, 1), got {sigma_min!r}")
        if isinstance(grid_power, bool) or not isinstance(grid_power, (int, float)) or not grid_power >= 1:
            raise ValueError(f"grid_power: expected a number ≥ 1 (1: a uniform time grid), got {grid_power!r}")
        self.grid_power = float(grid_power)
        self.context_features, self.theta_features = context_features, theta_features
        self.noise_features, self.sigma_min = theta_features, float(sigma_min)
        self.field = TimeConditionedMLP(context_features, theta_features, hidden, layers, time_features, activation)

    def velocity(self, theta: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor) -> torch.Tensor:
        """v_w(θ_t, t, e(y)) for ``theta (..., d)``, ``t (...)`` or a number, ``context (..., e)``."""
        return self.field(theta, t, context)

    def forward(self, context: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Draws ``(n, m, d)`` for contexts ``(n, e)`` and noise ``(n, m, d)``: the ODE from t = 0 to 1."""
        c = _check_noise(context, noise, self.noise_features)
        grid = 1 - (1 - torch.linspace(0, 1, self.steps + 1, dtype=torch.float64)) ** self.grid_power
        return integrate_midpoint(lambda th, t: self.field(th, t, c), noise, grid)

    def loss(self, context: torch.Tensor, theta: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The flow-matching regression loss per row, ``(n,)``, for contexts ``(n, e)`` and simulated
        (standardised, unconstrained) ``theta (n, d)``."""
        t = torch.rand(theta.shape[0], generator=generator, device=theta.device, dtype=theta.dtype)
        z = torch.randn(theta.shape, generator=generator, device=theta.device, dtype=theta.dtype)
        path = (1 - (1 - self.sigma_min) * t[:, None]) * z + t[:, None] * theta
        target = theta - (1 - self.sigma_min) * z
        return ((self.field(path, t, context) - target) ** 2).sum(-1)


class ScoreGenerator(nn.Module):
    r"""θ = f_w(e(y), z): a score-based (diffusion) generator, sampled by its probability-flow ODE.

    The variance-preserving diffusion (Song et al. 2021) noises θ as θ_t = α_t θ + σ_t ε with
    α_t = exp(−½ ∫₀ᵗ β), σ_t² = 1 − α_t², β(t) = β_min + t (β_max − β_min). A network ε_w learns
    the noise by denoising score matching,

        E_{t ~ U(t_min, 1), (θ, y) ~ p, ε ~ N(0, I)} ‖ε_w(θ_t, t, e(y)) − ε‖²,

    so that s_w = −ε_w / σ_t is the score ∇ log p_t(θ_t | y) of the noised posterior (NPSE,
    Geffner et al. 2023 and Sharrock et al. 2024, in this form). Sampling runs the probability-flow
    ODE dθ/dt = −½ β(t) (θ + s_w(θ, t, e(y))) from θ(1) = z ~ N(0, I) down to t_min, whose flow
    carries N(0, I) to the posterior; ``steps`` midpoint steps on a grid that is quadratic in t (finer
    near t_min, where the field changes fastest). The map is deterministic in z: an implicit
    generator, with no density evaluated.

    Args:
        context_features, theta_features, hidden, layers, time_features: as
            :class:`FlowMatchingGenerator`. steps: midpoint steps of the sampler.
        beta_min, beta_max: the noise schedule. t_min: where sampling stops (and training starts).
    """

    def __init__(self, context_features: int, theta_features: int, hidden: int = 128, layers: int = 4,
                 steps: int = 32, time_features: int = 8, beta_min: float = 0.1, beta_max: float = 20.0,
                 t_min: float = 1e-3, activation: type[nn.Module] = nn.SiLU):
        super().__init__()
        self.steps = _positive("steps", steps)
        if not 0 < beta_min < beta_max:
            raise ValueError(f"beta_min, beta_max: expected 0 < beta_min < beta_max, got {beta_min!r}, {beta_max!r}")
        if not 0 < t_min < 1:
            raise ValueError(f"t_min: expected a number in (0, 1), got {t_min!r}")
        self.context_features, self.theta_features = context_features, theta_features
        self.noise_features = theta_features
        self.beta_min, self.beta_max, self.t_min = float(beta_min), float(beta_max), float(t_min)
        self.field = TimeConditionedMLP(context_features, theta_features, hidden, layers, time_features, activation)

    def _beta(self, t):
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def _alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_alpha = -0.5 * (self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2)
        return log_alpha.exp(), (-torch.expm1(2 * log_alpha)).sqrt()

    def forward(self, context: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Draws ``(n, m, d)`` for contexts ``(n, e)`` and noise ``(n, m, d)``: the ODE from t = 1 to t_min."""
        c = _check_noise(context, noise, self.noise_features)

        def field(theta, t):
            _, sigma = self._alpha_sigma(torch.as_tensor(t, dtype=theta.dtype))
            return -0.5 * self._beta(t) * (theta - self.field(theta, t, c) / sigma)

        grid = torch.linspace(1.0, 0.0, self.steps + 1) ** 2
        return integrate_midpoint(field, noise, self.t_min + (1 - self.t_min) * grid)

    def loss(self, context: torch.Tensor, theta: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The denoising score-matching loss per row, ``(n,)`` (ε-prediction)."""
        t = self.t_min + (1 - self.t_min) * torch.rand(theta.shape[0], generator=generator, device=theta.device,
                                                         dtype=theta.dtype)
        eps = torch.randn(theta.shape, generator=generator, device=theta.device, dtype=theta.dtype)
        alpha, sigma = self._alpha_sigma(t)
        noised = alpha[:, None] * theta + sigma[:, None] * eps
        return ((self.field(noised, t, context) - eps) ** 2).sum(-1)


class ConsistencyGenerator(nn.Module):
    r"""θ = f_w(σ_max z, σ_max; e(y)): a consistency model (Song et al. 2023; CMPE, Schmitt et al.
    2024) — one network evaluation per draw.

    Noising θ_σ = θ + σ ε for σ ∈ [σ_min, σ_max] (variance exploding) has a probability-flow ODE
    whose trajectories end, at σ_min, at draws of p(θ | y). The consistency function maps every
    point of a trajectory to that end; it is parametrised to meet the boundary f(x, σ_min) = x exactly,

        f_w(x, σ) = c_skip(σ) x + c_out(σ) F_w(c_in(σ) x, τ(σ), e(y)),
        c_skip = σ_d² / ((σ − σ_min)² + σ_d²), c_out = σ_d (σ − σ_min) / √(σ² + σ_d²), c_in = 1 / √(σ² + σ_d²),

    with σ_d = 1 (θ is standardised) and τ(σ) = log(σ/σ_min) / log(σ_max/σ_min) ∈ [0, 1] the
    time fed to the :class:`TimeConditionedMLP` F_w. Consistency training, in the improved form of
    Song & Dhariwal (2023), asks two adjacent levels σ_i < σ_{i+1} of a Karras grid (ρ = 7) on the
    same trajectory to agree,

        E[ (σ_{i+1} − σ_i)⁻¹ d( f_w(θ + σ_{i+1} ε, σ_{i+1}), sg f_w(θ + σ_i ε, σ_i) ) ],

    with sg a stop-gradient (no teacher, no moving average), d the pseudo-Huber distance
    √(‖a − b‖² + c²) − c, c = 0.00054 √d, i drawn from a log-normal over σ (P_mean −1.1, P_std 2),
    and the number of levels doubling from ``levels[0]`` to ``levels[1]`` over ``total_steps``
    training steps (a buffer counts them, so a warm start continues the curriculum). The loss
    falls as the grid refines whatever the fit, so it cannot pick the best weights: ImplicitVI
    validates this family by the energy score of its draws instead.

    Sampling with ``steps`` = s > 1 alternates denoising and renoising on the first s levels of an
    s + 1-point Karras grid (the multistep sampler); the noise then has s · d coordinates.

    Args:
        context_features, theta_features, hidden, layers, time_features: as
            :class:`FlowMatchingGenerator`. steps: network evaluations per draw.
        sigma_min, sigma_max: the noise levels; σ_max = 10 σ_d, since θ is standardised (the
            images' 80 made one-step draws of a conditional Gaussian too narrow: KL 0.6–1.2 after
            3 000 steps, against 0.01–0.1 at 10).
        total_steps: training steps of the curriculum.
        levels: (first, last) number of grid intervals of the curriculum.
    """

    RHO, P_MEAN, P_STD, SIGMA_DATA = 7.0, -1.1, 2.0, 1.0

    def __init__(self, context_features: int, theta_features: int, hidden: int = 128, layers: int = 4,
                 steps: int = 1, time_features: int = 8, sigma_min: float = 0.002, sigma_max: float = 10.0,
                 total_steps: int = 20_000, levels: tuple[int, int] = (10, 1280),
                 activation: type[nn.Module] = nn.SiLU):
        super().__init__()
        self.steps = _positive("steps", steps)
        self.total_steps = _positive("total_steps", total_steps)
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"sigma_min, sigma_max: expected 0 < sigma_min < sigma_max, got {sigma_min!r}, {sigma_max!r}")
        if len(levels) != 2 or not 1 <= _positive("levels[0]", levels[0]) <= _positive("levels[1]", levels[1]):
            raise ValueError(f"levels: expected (first, last) with 1 <= first <= last, got {levels!r}")
        self.context_features, self.theta_features = context_features, theta_features
        self.noise_features = theta_features * self.steps
        self.sigma_min, self.sigma_max, self.levels = float(sigma_min), float(sigma_max), tuple(levels)
        self.field = TimeConditionedMLP(context_features, theta_features, hidden, layers, time_features, activation)
        self.register_buffer("trained_steps", torch.zeros((), dtype=torch.long))

    def grid(self, intervals: int, dtype=torch.float32, device=None) -> torch.Tensor:
        """The Karras grid of ``intervals`` + 1 noise levels, increasing from σ_min to σ_max."""
        a, b = self.sigma_min ** (1 / self.RHO), self.sigma_max ** (1 / self.RHO)
        return (a + torch.linspace(0, 1, intervals + 1, dtype=dtype, device=device) * (b - a)) ** self.RHO

    def consistency(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """f_w(x, σ; e(y)) for ``x (..., d)``, ``sigma (...)``, ``context (..., e)``."""
        s = sigma[..., None]
        sd2 = self.SIGMA_DATA**2
        c_skip = sd2 / ((s - self.sigma_min) ** 2 + sd2)
        c_out = self.SIGMA_DATA * (s - self.sigma_min) / (s**2 + sd2).sqrt()
        tau = (sigma / self.sigma_min).log() / math.log(self.sigma_max / self.sigma_min)
        return c_skip * x + c_out * self.field(x / (s**2 + sd2).sqrt(), tau, context)

    def forward(self, context: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Draws ``(n, m, d)`` for contexts ``(n, e)`` and noise ``(n, m, steps · d)``."""
        c = _check_noise(context, noise, self.noise_features)
        chunks = noise.split(self.theta_features, -1)
        levels = self.grid(self.steps, noise.dtype, noise.device).flip(0)[:-1]  # σ_max first
        theta = self.consistency(self.sigma_max * chunks[0], levels[0].expand(noise.shape[:-1]), c)
        for sigma, z in zip(levels[1:], chunks[1:]):
            x = theta + (sigma**2 - self.sigma_min**2).sqrt() * z
            theta = self.consistency(x, sigma.expand(noise.shape[:-1]), c)
        return theta

    def intervals(self) -> int:
        """The grid's intervals at the current training step (the doubling curriculum)."""
        first, last = self.levels
        stages = int(math.log2(last // first)) + 1
        per_stage = max(1, self.total_steps // stages)
        return min(first * 2 ** (int(self.trained_steps) // per_stage), last)

    def loss(self, context: torch.Tensor, theta: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The consistency-training loss per row, ``(n,)``; a call with gradients on counts as a
        training step of the curriculum."""
        n = self.intervals()
        sig = self.grid(n, theta.dtype, theta.device)
        cdf = torch.erf((sig.log() - self.P_MEAN) / (math.sqrt(2) * self.P_STD))
        i = torch.multinomial((cdf[1:] - cdf[:-1]).clamp_min(1e-12), theta.shape[0], replacement=True,
                              generator=generator)
        lo, hi = sig[i], sig[i + 1]
        eps = torch.randn(theta.shape, generator=generator, device=theta.device, dtype=theta.dtype)
        with torch.no_grad():
            target = self.consistency(theta + lo[:, None] * eps, lo, context)
        pred = self.consistency(theta + hi[:, None] * eps, hi, context)
        c = 0.00054 * math.sqrt(theta.shape[-1])
        distance = (((pred - target) ** 2).sum(-1) + c**2).sqrt() - c
        if torch.is_grad_enabled() and self.training:
            self.trained_steps += 1
        return distance / (hi - lo)


class DistilledGenerator(nn.Module):
    r"""An ODE sampler ``teacher`` (:class:`FlowMatchingGenerator` or :class:`ScoreGenerator`, a
    deterministic map z ↦ θ) and a one-step ``student`` (an :class:`ImplicitGenerator` of the same
    noise) that learns that map: the student minimises

        E_{y, z ~ N(0, I)} ‖g_w(e(y), z) − f_teacher(e(y), z)‖²,

    whose minimiser is the teacher's flow map itself, so its draws have the teacher's
    distribution at every y — for one network evaluation instead of the ODE's 2 · steps.

    ``forward`` draws from the student; ``loss`` is the teacher's own (train the teacher first);
    :meth:`distillation_loss` fits the student on pairs (z, f_teacher(e(y), z)) drawn beforehand.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module):
        super().__init__()
        for name, net in (("teacher", teacher), ("student", student)):
            if getattr(net, "noise_features", None) is None:
                raise ValueError(f"{name}: expected a generator with a noise_features attribute, got {type(net).__name__}")
        if teacher.noise_features != student.noise_features:
            raise ValueError(f"student: its noise has {student.noise_features} features, the teacher's {teacher.noise_features};"
                             " the student learns the teacher's map of the same noise")
        self.teacher, self.student = teacher, student
        self.noise_features = teacher.noise_features

    def forward(self, context: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The student's draws ``(n, m, d)`` for contexts ``(n, e)`` and noise ``(n, m, k)``."""
        return self.student(context, noise)

    def loss(self, context: torch.Tensor, theta: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The teacher's training loss per row, ``(n,)``."""
        return self.teacher.loss(context, theta, generator)

    def distillation_loss(self, context: torch.Tensor, noise: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Squared error per pair, ``(n, m)``, of the student at ``noise (n, m, k)`` against the
        teacher's draws ``target (n, m, d)`` from the same noise."""
        return ((self.student(context, noise) - target) ** 2).sum(-1)

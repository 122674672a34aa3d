r"""Neural posterior estimation (Papamakarios & Murray 2016; Greenberg et al. 2019).

A conditional flow q_φ(u | e(y)) on the latents in unconstrained, standardised coordinates u,
trained by maximum likelihood on the simulations (θ_i, y_i) ~ p(θ) p(y | θ):

    max_φ  E_{p(θ, y)} [ log q_φ(u(θ) | e(y)) ],

which minimises E_y KL(p(θ | y) ‖ q_φ(θ | y)) — the sleep phase of wake–sleep: forward KL,
mass-covering. Mapping θ through ``biject_to`` of each prior's support makes every draw land
inside the support (no rejection step, no leakage), and log q(θ | y) = log q(u | y) − log|dθ/du|.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ..nn import FLOWS, build_flow, short_softmax
from ..simulate import _Seeded
from ..space import ParameterSpace
from .base import Method, NeuralPosterior, _x_from, register_posterior
from .training import TrainConfig, train

__all__ = ["NPE", "NPEPosterior"]


@register_posterior
class NPEPosterior(NeuralPosterior):
    """A flow posterior: ``sample``, ``log_prob``, ``as_guide``, ``save``."""

    method = "npe"

    def __init__(self, space: ParameterSpace, observed, x_shapes, config: Mapping[str, Any],
                 embedding: nn.Module | None = None):
        super().__init__(space, observed, x_shapes, config, embedding)
        self.flow = build_flow(config["flow"], space.unconstrained_dim, self.context.out_features,
                               transforms=config["transforms"], hidden_features=config["hidden_features"],
                               affine_first=config.get("affine_first", False),  # older saves lack these keys
                               damp_splines=config.get("damp_splines", False),
                               spline_init=config.get("spline_init"))

    def distribution(self, x: torch.Tensor) -> torch.distributions.Distribution:
        """q(u_standardised | x) for ``x (n, *x_shape)``: the flow, mapped back from the linear
        regression's residual (``linear_residual``) when there is one."""
        s = self.context.standardize(x)
        q = self.flow(self.context.embedding(s))
        if self.residual is None:
            return q
        return torch.distributions.TransformedDistribution(q, [self.residual.transform(s.flatten(1))])

    def _sample_unconstrained(self, x, num_samples, generator):
        with _Seeded(int(torch.randint(0, 2**62, (), generator=generator)), self.device), short_softmax():
            u_s = self.distribution(x).sample((num_samples,))[:, 0]
        return self.theta_standardize.inverse(u_s)

    @torch.no_grad()
    def sample_batch(self, num_samples: int, observations: Any, *, seed: int | None = None) -> dict[str, torch.Tensor]:
        """Draws for B observations in one flow call: ``{site: (B, num_samples, *shape)}``."""
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples <= 0:
            raise ValueError(f"num_samples: expected a positive integer, got {num_samples!r}")
        rows = self._observation_rows(observations)
        x = _x_from(rows, self.observed)
        bad = self.context.standardize.use_log & (x <= 0)
        if bad.any():
            raise ValueError(f"observations: rows {sorted(set(bad.reshape(len(x), -1).any(1).nonzero().flatten().tolist()))[:10]} "
                             "have entries ≤ 0 where every training simulation was strictly positive")
        base = seed if seed is not None else int(torch.randint(0, 2**62, ()))
        with _Seeded(base, self.device), short_softmax():
            u_s = self.distribution(x).sample((num_samples,))  # (n, B, d)
        b = x.shape[0]
        u = self.theta_standardize.inverse(u_s.transpose(0, 1).reshape(b * num_samples, -1))
        return {k: v.reshape((b, num_samples) + tuple(v.shape[1:])) for k, v in self.space.to_constrained(u).items()}

    @torch.no_grad()
    def log_prob(self, theta: Mapping[str, torch.Tensor], observed: Any = None) -> torch.Tensor:
        """log q(θ | observed) in the latents' own (constrained) coordinates: ``(n,)``."""
        x = self._observation(observed)
        u = self.space.to_unconstrained({k: torch.as_tensor(v, device=self.device) for k, v in theta.items()})
        u_s = self.theta_standardize(u)
        log_q = self.distribution(x).log_prob(u_s) - self.theta_standardize.scale.log().sum()
        return log_q - self.space.log_abs_det_jacobian(u)


class NPE(Method):
    """Neural posterior estimation with a conditional normalizing flow (NSF by default).

    Options: ``flow`` (one of ``implicitbayes.nn.FLOWS``), ``transforms``, ``hidden_features``,
    ``embedding`` (an ``nn.Module`` on the standardised observation), ``affine_first``,
    ``damp_splines``, ``spline_init``, ``linear_residual``, and the training loop's ``batch_size``, ``lr``, ``validation_fraction``,
    ``patience``, ``validate_every``, ``device``.

    ``affine_first`` (default on) puts a conditional affine autoregressive layer before the flow's
    ``transforms`` (see :func:`implicitbayes.nn.build_flow`). Measured against the plain NSF on
    the sbibm suite's 14 cells (benchmarks/results/npe_ablation.md, C2ST over observations 1–5):
    better on 8 (sir 10³ 0.735 → 0.665, two_moons 10³ 0.707 → 0.661, bernoulli_glm 10⁴
    0.663 → 0.645, sir 10⁴ 0.606 → 0.591), worse by 0.004–0.009 on five 10³ cells; mean −0.010.

    ``damp_splines`` (default off; NSF only) divides the spline conditioners' bin-width and
    bin-height logits by √h, as nflows (and so sbi's NSF) does: a pull towards a flow that is
    affine in θ. It helps where the posterior is near Gaussian and hurts where its shape is what
    matters (npe_ablation.md, session 12): slcp 10⁴ 0.866 → 0.848, gaussian_linear 10⁴
    0.550 → 0.539, 10³ 0.660 → 0.640, but two_moons 10⁴ 0.537 → 0.574, 10³ 0.661 → 0.757.

    ``spline_init`` (NSF only; ``"auto"``: 10⁻³ for ``flow="nsf"``, None for the others) draws
    the spline conditioners' output layers from U(±spline_init), so that each spline starts as
    the identity whatever the context (see :func:`implicitbayes.nn.build_flow`); None keeps
    PyTorch's default initialisation, under which the five splines start as random monotone
    bends of θ. Measured on the suite's 14 cells (npe_ablation.md, session 13): better on 9
    (slcp 10⁴ 0.866 → 0.824, gaussian_linear 10³ 0.660 → 0.628, lotka_volterra_ode 10⁴
    0.894 → 0.867, sir 10⁴ 0.591 → 0.578), worse by 0.001–0.014 on five; mean −0.010 (one
    seed: over three, gaussian_linear 10⁴ shows no gain, 0.549 → 0.553).

    ``linear_residual`` (``"auto"``, the default; ``True``; ``False``) regresses standardised θ on
    the standardised observation by least squares before training, and the flow models the
    residual (u − A s − b)/σ (:class:`implicitbayes.nn.LinearResidual`); draws and ``log_prob``
    are mapped back. Where the posterior's location is linear in the data the flow then starts
    with it right: on gaussian_linear 10⁴ our flow was closer to the posterior than sbi's in KL
    but its mean 0.4–0.6 posterior sd off, and the residual takes C2ST from 0.543 to 0.506 (sbi
    0.532; 10³: 0.628 → 0.533, sbi 0.657). Where it is not, the residuals are skewed or
    heavy-tailed and the flow does worse on them (npe_ablation.md, session 14: sir 10⁴ 0.578 →
    0.606, lotka_volterra_ode 10⁴ 0.867 → 0.935). ``"auto"`` fits the regression where it is well
    determined (at most ``LINEAR_MAX_FEATURES`` observation numbers, ≥ ``LINEAR_ROWS_PER_FEATURE``
    simulations per coefficient) and keeps it only where the residuals look Gaussian — every
    coordinate's |skewness| ≤ 0.5 and |excess kurtosis| ≤ 1
    (``NeuralPosterior.fit_residual``), as a homoscedastic linear-Gaussian relation makes them.
    On the suite it is kept on gaussian_linear (largest |excess kurtosis| 0.33 at 10³, 0.07 at
    10⁴) and dropped on the other six tasks (≥ 1.7); where dropped, the flow runs bit for bit as
    with ``False`` (session 15). The rule errs on the safe side: on gaussian_linear_uniform, whose
    box prior makes θ's unconstrained (logit) coordinates heavy-tailed, it is dropped (5.1)
    although it would help there (10³ 0.697 → 0.640; pass ``True``). The decision and the moments
    are in ``training_summary["linear_residual"]``.

    ``patience`` is 50 validations (one per epoch): the learning rate decays along a cosine over
    ``max_steps``, and late, low-rate steps still pay. Measured on two_moons with 10⁴
    simulations (observations 1–3): patience 20 stopped after 68 epochs with C2ST 0.577; 50 ran to
    ``max_steps`` with 0.528 (validation NLL −2.02 → −2.18).
    """

    def __init__(self, model: Callable, *, observed: str | Sequence[str], model_args: tuple = (),
                 model_kwargs: Mapping | None = None, flow: str = "nsf", transforms: int = 5,
                 hidden_features: Sequence[int] = (50, 50), embedding: nn.Module | None = None,
                 affine_first: bool = True, damp_splines: bool = False, spline_init: float | str | None = "auto",
                 linear_residual: bool | str = "auto",
                 batch_size: int = 50, lr: float = 5e-4,
                 max_steps: int = 30_000, validation_fraction: float = 0.1, patience: int = 50,
                 validate_every: int | None = None, device: str | torch.device | None = None):
        if flow not in FLOWS:
            raise ValueError(f"flow: expected one of {FLOWS}, got {flow!r}")
        super().__init__(model, observed, model_args, model_kwargs, embedding,
                         TrainConfig(batch_size=batch_size, lr=lr, max_steps=max_steps, patience=patience,
                                     validation_fraction=validation_fraction, validate_every=validate_every), device)
        if not isinstance(affine_first, bool):
            raise ValueError(f"affine_first: expected True or False, got {affine_first!r}")
        self.flow, self.transforms, self.hidden_features = flow, int(transforms), tuple(hidden_features)
        self.affine_first = affine_first
        if not isinstance(damp_splines, bool):
            raise ValueError(f"damp_splines: expected True or False, got {damp_splines!r}")
        if damp_splines and flow != "nsf":
            raise ValueError(f"damp_splines: only flow='nsf' has spline logits to damp, got flow={flow!r}")
        self.damp_splines = damp_splines
        if spline_init == "auto":
            spline_init = self.SPLINE_INIT if flow == "nsf" else None
        elif spline_init is not None:
            if isinstance(spline_init, bool) or not isinstance(spline_init, (int, float)) or not 0 < spline_init < math.inf:
                raise ValueError(f"spline_init: expected 'auto', a positive number or None, got {spline_init!r}")
            if flow != "nsf":
                raise ValueError(f"spline_init: only flow='nsf' has spline conditioners, got flow={flow!r}")
        self.spline_init = None if spline_init is None else float(spline_init)
        self._check_linear_residual(linear_residual)
        self.linear_residual = linear_residual

    SPLINE_INIT = 1e-3

    def fit(self, data, *, max_steps: int | None = None, time_budget: float | None = None, seed: int | None = None,
            progress: bool = True, checkpoint=None) -> NPEPosterior:
        """Train on a SimulationSet; returns an :class:`NPEPosterior`."""
        prep, seed, loop = self._begin(data, max_steps, time_budget, seed)
        config = self._config(prep, flow=self.flow, transforms=self.transforms,
                              hidden_features=list(self.hidden_features), affine_first=self.affine_first,
                              damp_splines=self.damp_splines, spline_init=self.spline_init,
                              linear_residual=self._resolve_linear_residual(prep.x.shape))
        with _Seeded(seed, self.device):
            post = NPEPosterior(prep.space, prep.observed, prep.x_shapes, config, self.embedding).to(self.device)
            x = prep.x_on(self.device)
            u_s = post.fit_standardizers(prep.x, prep.u.to(self.device))
            residual = post.fit_residual(x, u_s, auto=self.linear_residual == "auto")  # see distribution()

            def step(idx, g):
                return {"nll": -post.distribution(x[idx]).log_prob(u_s[idx]).mean()}

            def validate(idx):
                return float(sum(-post.distribution(x[i]).log_prob(u_s[i]).sum() for i in idx.split(4096)) / len(idx))

            post.training_summary = train({"posterior": post}, step, validate, len(x), loop, seed=seed,
                                          progress=progress, checkpoint=checkpoint, desc="NPE")
            if residual is not None:
                post.training_summary["linear_residual"] = residual
        return post.attach_model(self.model, self.model_args, self.model_kwargs)

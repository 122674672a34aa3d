r"""Implicit variational posterior by joint matching (Tran, Ranganath & Blei 2017; seed 000).

Model joint p(θ, y) = π(θ) p(y | θ); generator joint q(θ, y) = q_w(θ | y) p(y) with the
implicit sampler θ̃ = f_w(e(y), z), z ~ N(0, I), on the same simulated y. A critic r_u(y, θ)
trained by logistic regression (model pairs labelled 1)

    max_u E_p[log σ(r_u)] + E_q[log(1 − σ(r_u))]   ⇒   r* = log p(θ, y)/q(θ, y) = log p(θ | y)/q(θ | y)

estimates the log density ratio of posterior and generator (both joints share p(y)).

Training, in two stages (θ in unconstrained, standardised coordinates; with ``locate=True`` a
stage 0 first fits the generator's location net μ(e(y)) by the spatial median and freezes it, and
f_w = μ(e(y)) + g_w(e(y), z) then learns the residuals):

1. Generator: min_w  E_y[ ES_m(f_w(y, ·), θ) ] + λ · E_{y,z}[ softplus(−r_u(y, f_w(y, z))) ], the
   energy score of m draws per y (Pacchiardi & Dutta 2022) plus the non-saturating adversarial
   loss against a critic r_u co-trained by the logistic loss above (``adversarial_weight`` λ).
2. Correction critic: with f_w frozen, a fresh critic is trained to convergence by the logistic
   loss (early-stopped on held-out pairs), so that it estimates log p(θ | y)/q_w(θ | y). It sees
   θ twice (``critic_frame="both"``): standardised by the prior's simulations, and in the
   generator's own frame at y, (θ − m(y))/s(y) with m, s the mean and sd of f_w(y, ·) over 64
   fixed noise draws — a deterministic function of y, so the critic is still a function of
   (y, θ). Where the posterior is far narrower than the prior (lotka_volterra_ode) the first
   alone leaves the generator's errors below what the critic resolves: it learned nothing there
   (held-out loss at chance, λ = 0 chosen, C2ST 0.901); with the local frame it learns (λ = ¾,
   0.888), and two_moons is unchanged (0.577; ablation, session 8).

Defaults (chosen by the ablation in ``benchmarks/results/implicit_vi_ablation.md``): λ = 0 —
co-training the generator against a critic made the *corrected* posterior worse at every budget
we measured — so the ratio-estimating critic enters through stage 2, and every default draw is
weighted by it; the energy score only shapes the proposal it corrects.

Sampling is sampling-importance-resampling with that ratio (``correction="sir"``): draw K
candidates θ̃_k ~ q_w(· | y), keep one with probability ∝ exp λ r(y, θ̃_k). The strength λ ∈
{0, ¼, ½, ¾, 1, 1¼, 1½, 2, 3} is chosen after training by the held-out log score of the SIR
draw's exact density with those K candidates (``_select_temperature``; ``config["temperature"]``):
λ = 0 where the critic is overfit, as it can be with 10³ simulations, and above 1 where the critic
is good and K candidates alone would move q_w only part of the way. As K → ∞ the draw's
law tends to q_w(θ | y) exp λr / Z, which is p(θ | y) for λ = 1 where r is exact. K = 8 by default (10 000 draws in
≈ 0.3 s on one CPU core); the generator's noise has max(2 dim θ, 8) coordinates — more than
dim θ, which lets a continuous map put mass on separated or spiky regions — and it trains with
patience 60 validations, halving its learning rate after every 10 validations without improvement
(``lr_plateau``; the cosine decay over ``max_steps`` alone barely lowers the rate before early
stopping): all three sharpen the proposal so that 8 candidates suffice (session-4 and session-5
ablations in ``benchmarks/results/implicit_vi_ablation.md``). The generator has a linear path from
its noise to its output, f_w(y, z) = g(y, z) + A z (``noise_skip``): the shape a Gaussian posterior
shares across observations is then learnt by A from every simulation at once, where an MLP alone
learns it separately at each y and, with 10³ simulations, invents correlations between
coordinates (gaussian_linear, observation 1: rms 0.20 where the posterior has none; 0.16 with the
skip). A starts at zero, so the generator starts as the MLP alone (A at PyTorch's default
initialisation decorrelated further but cost two_moons 0.026 at 10⁴). With 10³ simulations the
C2ST fell from 0.741 to 0.676 on gaussian_linear and from 0.888 to 0.746 on bernoulli_glm
(session-9 ablation). The shared shape is a Gaussian one, and once simulations are plentiful the
bias costs more than the pooling gains: at 10⁴ it raised C2ST on gaussian_mixture (a broad and a
narrow component) and sir by 0.035 each, while bernoulli_glm still gained 0.021. So by default
(``noise_skip=None``) the path is on below ``NOISE_SKIP_BELOW`` = 2 500 simulations per latent
dimension — every 10³ cell of the suite and the 10⁴ cells of the 5- and 10-dimensional tasks — and
off above (session-10 ablation). The generator stays implicit: no density of q_w is ever
evaluated. ``correction=None`` returns the generator's own draws.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..losses import RATIO_LOSSES, contrastive_loss, energy_score, kernel_score, logistic_loss, ratio_loss
from ..nn import Critic, ImplicitGenerator
from ..simulate import _Seeded
from ..space import ParameterSpace
from .base import Method, NeuralPosterior, register_posterior
from .training import TrainConfig, check_ema, train

__all__ = ["ImplicitVI", "ImplicitPosterior"]

# noise_skip=None turns the linear noise path on below this many simulations per latent
# dimension: it pools the posterior's shape over every simulation, which pays where they are
# scarce; with more, its Gaussian bias cost gaussian_mixture and sir 0.035 each at 10⁴ (2 dims,
# 5 000 per dimension) where bernoulli_glm (10 dims, 1 000 per dimension) still gained 0.02
# (session-10 ablation).
NOISE_SKIP_BELOW = 2500


@register_posterior
class ImplicitPosterior(NeuralPosterior):
    """An implicit posterior f_w(e(y), z) with an optional critic correcting its draws (SIR)."""

    method = "implicit_vi"

    def __init__(self, space: ParameterSpace, observed, x_shapes, config: Mapping[str, Any],
                 embedding: nn.Module | None = None):
        super().__init__(space, observed, x_shapes, config, embedding)
        d = space.unconstrained_dim
        self.generator = ImplicitGenerator(self.context.out_features, d, config["noise_features"], config["hidden"],
                                           config["layers"], config["noise_injection"],
                                           noise_skip=config.get("noise_skip", False),
                                           locate=config.get("locate", False))
        frame = config.get("critic_frame", "global")
        if frame not in ("global", "local", "both"):  # a saved config edited by hand
            raise ValueError(f"config['critic_frame']: expected 'global', 'local' or 'both', got {frame!r}")
        self.critic = Critic(2 * d if frame == "both" else d, self.context.out_features, config["critic_hidden"],
                             config["critic_layers"])
        self.last_ess: float | None = None
        if frame in ("local", "both"):
            # fixed noise for the critic's local frame, a deterministic function of y (saved with the weights)
            g = torch.Generator().manual_seed(0)
            self.register_buffer("frame_noise", torch.randn((self.FRAME_DRAWS, config["noise_features"]), generator=g))

    FRAME_DRAWS = 64

    def _noise_to_input(self, noise: torch.Tensor) -> torch.Tensor:
        bits = self.config.get("noise_bits", 0)
        if bits:  # the last `bits` noise coordinates are random signs: a switch between modes
            noise = torch.cat([noise[..., :-bits], torch.sign(noise[..., -bits:])], -1)
        return noise

    def critic_frame(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The local frame (loc, scale), each ``(n, d)``, in which the critic sees θ for the contexts
        ``c`` (n, e): mean and standard deviation of the generator's draws at y from
        ``FRAME_DRAWS`` fixed noise vectors; None when the critic sees θ as is (``critic_frame="global"``)."""
        if self.config.get("critic_frame", "global") == "global":
            return None
        noise = self._noise_to_input(self.frame_noise).expand(c.shape[0], -1, -1)
        draws = self.generator(c, noise)  # (n, M, d)
        return draws.mean(1), draws.std(1) + self.FRAME_FLOOR

    FRAME_FLOOR = 1e-6

    def log_ratio(self, c: torch.Tensor, u: torch.Tensor,
                  frame: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The critic's log p(θ | y)/q_w(θ | y) at standardised ``u`` (n, [m,] d) for contexts ``c`` (n, e);
        ``frame`` is ``critic_frame(c)`` when already computed."""
        frame = self.critic_frame(c) if frame is None else frame
        if frame is not None:
            loc, scale = frame
            if u.dim() == 3:
                loc, scale = loc[:, None], scale[:, None]
            local = (u - loc) / scale
            u = torch.cat([u, local], -1) if self.config["critic_frame"] == "both" else local
        return self.critic(c, u)

    def _draw_standardized(self, c: torch.Tensor, m: int, generator: torch.Generator) -> torch.Tensor:
        noise = torch.randn((c.shape[0], m, self.generator.noise_features), generator=generator,
                            device=c.device, dtype=c.dtype)
        return self.generator(c, self._noise_to_input(noise))

    def _sample_unconstrained(self, x, num_samples, generator, correction: str | None = "default",
                              num_candidates: int | None = None):
        correction = self.config["correction"] if correction == "default" else correction
        k = num_candidates or self.config["num_candidates"]
        c = self.context(x)  # (1, e)
        frame = None if correction is None else self.critic_frame(c)
        if correction is None or k == 1 or self.config.get("temperature", 1.0) == 0:
            u_s = self._draw_standardized(c, num_samples, generator)[0]
            self.last_ess = None
        else:
            out, ess = [], []
            for chunk in torch.arange(num_samples).split(max(1, 4096 // k)):  # activations stay in cache
                cand = self._draw_standardized(c, len(chunk) * k, generator)[0].reshape(len(chunk), k, -1)
                n = len(chunk)
                f = None if frame is None else (frame[0].expand(n, -1), frame[1].expand(n, -1))
                logw = self.config.get("temperature", 1.0) * self.log_ratio(c.expand(n, -1), cand, f)  # (n, k)
                w = torch.softmax(logw, 1)
                pick = torch.multinomial(w, 1, generator=generator).squeeze(1)
                out.append(cand[torch.arange(len(chunk)), pick])
                ess.append(1.0 / (w**2).sum(1))
            u_s = torch.cat(out)
            self.last_ess = float(torch.cat(ess).mean())  # effective candidates per draw, out of k
        if self.residual is not None:  # the draws are of θ's linear residual
            u_s = self.residual.transform(self.regressors(x))(u_s)
        return self.theta_standardize.inverse(u_s)

    @torch.no_grad()
    def sample(self, num_samples: int, observed: Any = None, *, seed: int | None = None,
               correction: str | None = "default", num_candidates: int | None = None) -> dict[str, torch.Tensor]:
        """Posterior draws ``{site: (num_samples, *shape)}``; ``correction="sir"`` (default when
        trained with it) resamples ``num_candidates`` generator draws by the critic's ratio,
        ``correction=None`` returns raw generator draws. ``self.last_ess`` is then the mean
        effective number of candidates per draw (near K: the generator already matches)."""
        if correction not in ("default", "sir", None):
            raise ValueError(f"correction: expected 'sir' or None, got {correction!r}")
        if num_candidates is not None and (not isinstance(num_candidates, int) or num_candidates < 1):
            raise ValueError(f"num_candidates: expected a positive integer, got {num_candidates!r}")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples <= 0:
            raise ValueError(f"num_samples: expected a positive integer, got {num_samples!r}")
        x = self._observation(observed)
        g = torch.Generator(device=self.device)
        g.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ())))
        return self.space.to_constrained(self._sample_unconstrained(x, num_samples, g, correction, num_candidates))


class _Contexts:
    """e(y) of every training row, with the critic's local frame (``ImplicitPosterior.critic_frame``),
    for the critic stage (embedding and generator are frozen then): computed once and kept when
    they take at most ``CACHE_BYTES``, else recomputed per minibatch, so a memory-mapped set is
    never held whole. ``contexts[idx]`` is ``(c, frame)``."""

    CACHE_BYTES = 512 * 2**20

    def __init__(self, post: ImplicitPosterior, x):
        self.post, self.x = post, x
        self.device = post.context.standardize.loc.device
        self.cache = None
        width = post.context.out_features + 2 * post.space.unconstrained_dim
        if len(x) * width * 4 <= self.CACHE_BYTES:
            parts = [self._compute(i) for i in torch.arange(len(x)).split(4096)]
            c = torch.cat([p[0] for p in parts])
            frame = None if parts[0][1] is None else tuple(torch.cat([p[1][j] for p in parts]) for j in (0, 1))
            self.cache = (c, frame)

    @torch.no_grad()
    def _compute(self, idx: torch.Tensor):
        c = self.post.context(self.x[idx])
        return c, self.post.critic_frame(c)

    def __getitem__(self, idx: torch.Tensor):
        if self.cache is None:
            return self._compute(idx)
        c, frame = self.cache
        return c[idx], None if frame is None else (frame[0][idx], frame[1][idx])


class ImplicitVI(Method):
    """Amortized implicit posterior trained against a ratio-estimating critic (module docstring).

    Options (defaults are the recommended settings): ``scoring_rule`` ("energy", "kernel" or
    None), ``num_draws`` m per observation, ``adversarial_weight`` λ and ``critic_loss`` (any
    consistent ratio loss in ``implicitbayes.losses.RATIO_LOSSES``) for stage 1; ``correction``
    ("sir" or None) and ``num_candidates`` K; ``correction_loss`` (the correction critic's
    objective: None for ``critic_loss``, another ratio loss, or "contrastive" — pick the simulated θ
    among 1 + ``correction_negatives`` generator draws for its y, which learns log p/q up to a
    constant per y, all that SIR needs; measured no better than the default on two_moons and
    gaussian_mixture at 2–4× the critic's time) and ``correction_negatives`` (generator draws per
    simulated pair in the critic's loss; 1); ``critic_frame`` (how the correction critic sees θ:
    "global" standardised by the simulations, "local" in the generator's frame at y, "both"
    concatenated; module docstring); network sizes ``hidden``, ``layers``,
    ``noise_features``, ``noise_injection``, ``critic_hidden``, ``critic_layers``;
    ``embedding``; loop settings ``batch_size``, ``lr``, ``critic_steps`` (stage-2 budget),
    ``patience`` (generator validations without improvement before stopping; 60, because its
    held-out energy score improves slowly while the shape still improves), ``lr_plateau`` (halve
    the generator's learning rate after this many validations without improvement; 10, None for
    the cosine decay alone), ``critic_patience``, ``critic_plateau`` (the same for the critic; off),
    ``ema`` / ``critic_ema`` (Polyak averaging of the generator's / critic's weights; off: measured
    worse / no better in the ablation),
    ``noise_bits`` (random-sign noise coordinates, a switch between modes; off by default),
    ``noise_skip`` (the generator's linear path from noise to output, module docstring; None: on
    below ``NOISE_SKIP_BELOW`` = 2500 simulations per latent dimension),
    ``locate`` (stage 0: fit a location net μ(e(y)) of the generator by the spatial median of θ
    given y, freeze it, and let the generator shape θ − μ(e(y)) around it; off: slcp 10⁴
    0.901 → 0.889, gaussian_mixture 10⁴ raw draws 0.752 → 0.694 but corrected ones 0.625 →
    0.630, two_moons 10⁴ 0.568 → 0.603, whose median lies off the crescent; ablation, session 13),
    ``linear_residual`` (off; ``True`` or ``"auto"`` as for :class:`implicitbayes.NPE`: the
    generator and the critics work on θ's residual from a least-squares regression on the
    standardised observation, and draws are mapped back. Not NPE's default here: gaussian_linear
    10⁴ 0.550 → 0.529, but 10³ 0.677 → 0.932, where the energy-score generator's draws of the
    residual came out nearly degenerate, covariance eigenvalues 0.02–2.0 against 1, and the critic
    told them from simulations 93 % of the time; ablation, sessions 14–15),
    ``device``.
    """

    def __init__(self, model: Callable, *, observed: str | Sequence[str], model_args: tuple = (),
                 model_kwargs: Mapping | None = None, scoring_rule: str | None = "energy", num_draws: int = 8,
                 adversarial_weight: float = 0.0, critic_loss: str = "logistic", correction: str | None = "sir",
                 correction_loss: str | None = None, correction_negatives: int = 1, critic_frame: str = "both",
                 num_candidates: int = 8, hidden: int = 128, layers: int = 4, noise_features: int | None = None,
                 noise_bits: int = 0, noise_skip: bool | None = None, locate: bool = False,
                 linear_residual: bool | str = False,
                 noise_injection: str = "concat", critic_hidden: int = 128, critic_layers: int = 4,
                 embedding: nn.Module | None = None, batch_size: int = 128, lr: float = 1e-3, max_steps: int = 20_000,
                 critic_steps: int = 10_000, patience: int = 60, critic_patience: int = 20, lr_plateau: int | None = 10,
                 critic_plateau: int | None = None, ema: float | None = None, critic_ema: float | None = None,
                 validate_every: int | None = 50,
                 validation_fraction: float = 0.1, device: str | torch.device | None = None):
        for name, value in (("lr_plateau", lr_plateau), ("critic_plateau", critic_plateau)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}: expected a positive integer or None, got {value!r}")
        check_ema("ema", ema)
        check_ema("critic_ema", critic_ema)
        super().__init__(model, observed, model_args, model_kwargs, embedding,
                         TrainConfig(batch_size=batch_size, lr=lr, max_steps=max_steps, patience=patience,
                                     plateau=lr_plateau, ema=ema, validate_every=validate_every,
                                     validation_fraction=validation_fraction), device)
        if scoring_rule not in ("energy", "kernel", None):
            raise ValueError(f"scoring_rule: expected 'energy', 'kernel' or None, got {scoring_rule!r}")
        if scoring_rule is None and adversarial_weight <= 0:
            raise ValueError("with scoring_rule=None the generator needs adversarial_weight > 0")
        if correction not in ("sir", None):
            raise ValueError(f"correction: expected 'sir' or None, got {correction!r}")
        loss = ratio_loss(critic_loss)
        if not loss.consistent:
            raise ValueError(f"critic_loss: {critic_loss!r} does not estimate a density ratio")
        if isinstance(critic_patience, bool) or not isinstance(critic_patience, int) or critic_patience < 1:
            raise ValueError(f"critic_patience: expected a positive integer, got {critic_patience!r}")
        if correction_loss is not None and correction_loss != "contrastive":
            if correction_loss not in RATIO_LOSSES:
                raise ValueError(f"correction_loss: expected None, 'contrastive' or a ratio loss in "
                                 f"{sorted(RATIO_LOSSES)}, got {correction_loss!r}")
            if not RATIO_LOSSES[correction_loss].consistent:
                raise ValueError(f"correction_loss: {correction_loss!r} does not estimate a density ratio")
        if isinstance(correction_negatives, bool) or not isinstance(correction_negatives, int) or correction_negatives < 1:
            raise ValueError(f"correction_negatives: expected a positive integer, got {correction_negatives!r}")
        if critic_frame not in ("global", "local", "both"):
            raise ValueError(f"critic_frame: expected 'global', 'local' or 'both', got {critic_frame!r}")
        if isinstance(noise_bits, bool) or not isinstance(noise_bits, int) or noise_bits < 0:
            raise ValueError(f"noise_bits: expected a non-negative integer, got {noise_bits!r}")
        if num_draws < 2:
            raise ValueError(f"num_draws: the scoring rule needs at least 2 draws per observation, got {num_draws}")
        self.scoring_rule, self.num_draws, self.adversarial_weight = scoring_rule, num_draws, float(adversarial_weight)
        self.critic_loss, self.correction, self.num_candidates = critic_loss, correction, num_candidates
        self.correction_loss, self.correction_negatives = correction_loss, correction_negatives
        self.critic_frame = critic_frame
        if noise_skip is not None and not isinstance(noise_skip, bool):
            raise ValueError(f"noise_skip: expected True, False or None (on below {NOISE_SKIP_BELOW} simulations "
                             f"per latent dimension), got {noise_skip!r}")
        if not isinstance(locate, bool):
            raise ValueError(f"locate: expected True or False, got {locate!r}")
        self._check_linear_residual(linear_residual)
        self.linear_residual = linear_residual
        self.net = {"hidden": hidden, "layers": layers, "noise_features": noise_features, "noise_bits": noise_bits,
                    "noise_skip": noise_skip, "locate": locate,
                    "noise_injection": noise_injection, "critic_hidden": critic_hidden, "critic_layers": critic_layers}
        self.critic_loop = TrainConfig(batch_size=512, lr=lr, max_steps=critic_steps, patience=critic_patience,
                                       plateau=critic_plateau, ema=critic_ema,
                                       validate_every=validate_every, validation_fraction=validation_fraction)

    def _score(self, draws: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.scoring_rule == "energy":
            return energy_score(draws, target).mean()
        if self.scoring_rule == "kernel":
            return kernel_score(draws, target).mean()
        return torch.zeros((), device=draws.device)

    TEMPERATURES = (3.0, 2.0, 1.5, 1.25, 1.0, 0.75, 0.5, 0.25, 0.0)

    @torch.no_grad()
    def _select_temperature(self, post, c_all, u_s, critic_settings, seed) -> dict[float, float]:
        """Held-out log score of the sampler actually used, SIR with K candidates, for each λ.

        A draw of SIR with K candidates (θ_1 … θ_K ~ q_w(· | y), keep θ_I with probability
        ∝ w_I = exp λ r(y, θ_I)) has the density, by exchangeability of the candidates,

            q_K(θ | y) = q_w(θ | y) · E_{θ_2..θ_K ~ q_w}[ K w(θ) / (w(θ) + Σ_{j≥2} w_j) ],

        so on pairs (y, θ) ~ p held out from the critic's fit the change of cross-entropy is

            −E_p[log q_K(θ | y)] + E_p[log q_w(θ | y)] = −E_p log E[ K w(θ) / (w(θ) + Σ_{j≥2} w_j) ],

        estimated with groups of K − 1 fresh generator draws per y. It needs no density of q_w
        (which stays implicit) and does not assume r is right: λ = 0 (the generator alone) scores
        0, the lowest wins, and a critic of pure noise scores > 0 at every λ > 0 (Jensen), so it is
        never used. With few simulations the critic can overfit and the correction then hurts
        (measured: gaussian_linear at 10³, mean error 1.4 sd with λ = 1, 0.4 sd without); this
        keeps it only where held-out data say it helps. K is the posterior's ``num_candidates``:
        with few candidates SIR moves q_w only part of the way to q_w e^{λr}/Z, and a λ above 1
        can make up for it. Sessions 4–10 chose λ ∈ [0, 1] by the K → ∞ limit of this score,
        −λ E_p[r] + E_y log E_q[e^{λr}], which picked λ = 1 on two_moons 10⁴ where the K = 8 score
        picks 2 (C2ST 0.577 → 0.568; ablation, session 11). (Before session 4, an energy score of
        the corrected draws, which does not see shape, picked λ = 0 where λ = ½ halved the C2ST
        gap.)"""
        from .training import split

        k = int(post.config["num_candidates"])
        if k == 1:  # one candidate: SIR returns it whatever λ is
            return {lam: 0.0 for lam in self.TEMPERATURES}
        _, val_idx = split(len(u_s), critic_settings.validation_fraction, torch.Generator().manual_seed(seed + 1))
        idx = val_idx[:1024].to(c_all.device)
        g = torch.Generator(device=c_all.device).manual_seed(seed + 3)
        groups = max(1, self.SELECTION_DRAWS // (k - 1))
        m = groups * (k - 1)
        c, frame = c_all[idx]
        r_true = post.log_ratio(c, u_s[idx], frame)  # (n,)
        # m generator draws per held-out observation, 64 observations at a time (bounded activations)
        r_gen = torch.cat([post.log_ratio(c[i], post._draw_standardized(c[i], m, g),
                                          None if frame is None else (frame[0][i], frame[1][i]))
                           for i in torch.arange(len(idx), device=c.device).split(64)])  # (n, m)
        r_gen = r_gen.reshape(len(idx), groups, k - 1)
        scores = {}
        for lam in self.TEMPERATURES:
            if lam == 0:  # uniform weights: the draw is q_w's
                scores[lam] = 0.0
                continue
            own = (lam * r_true)[:, None, None].expand(-1, groups, 1)
            log_share = math.log(k) + own[..., 0] - torch.logsumexp(torch.cat([own, lam * r_gen], -1), -1)  # (n, G)
            scores[lam] = float(-(torch.logsumexp(log_share, 1) - math.log(groups)).mean())
        return scores

    SELECTION_DRAWS = 256

    @staticmethod
    def _fit_location(post, x, u_s, loop, seed, progress, checkpoint) -> dict:
        """Stage 0 (``locate=True``): fit the generator's location net μ(e(y)) to the simulated θ by
        the spatial median, min E‖μ(e(y)) − θ‖ (the energy score's first term with one draw
        at μ), early-stopped on the held-out rows, then freeze it; the generator then learns
        θ − μ(e(y)) around it."""
        net = post.generator.locate

        def step(idx, g):
            return {"loss": (net(post.context(x[idx])) - u_s[idx]).norm(dim=-1).mean()}

        def validate(idx):
            return float(sum((net(post.context(x[i])) - u_s[i]).norm(dim=-1).sum() for i in idx.split(4096)) / len(idx))

        out = train({"context": post.context, "locate": net}, step, validate, len(x), loop, seed=seed,
                    progress=progress, checkpoint=None if checkpoint is None else f"{checkpoint}.locate",
                    desc="ImplicitVI location")
        for p in net.parameters():
            p.requires_grad_(False)
        return out

    def fit(self, data, *, max_steps: int | None = None, time_budget: float | None = None, seed: int | None = None,
            progress: bool = True, checkpoint=None) -> ImplicitPosterior:
        """Train on a SimulationSet; returns an :class:`ImplicitPosterior`.

        ``max_steps`` and ``time_budget`` apply to each stage; ``checkpoint`` is a path prefix
        (``<checkpoint>.generator`` and ``<checkpoint>.critic`` are written, and
        ``<checkpoint>.locate`` with ``locate=True``).
        """
        prep, seed, loop = self._begin(data, max_steps, time_budget, seed)
        critic_settings = self._settings(self.critic_loop, max_steps, time_budget)
        config = self._config(prep, **self.net, correction=self.correction, num_candidates=self.num_candidates,
                              critic_frame=self.critic_frame,
                              linear_residual=self._resolve_linear_residual(prep.x.shape))
        if config["noise_skip"] is None:
            config["noise_skip"] = len(prep.x) < NOISE_SKIP_BELOW * prep.space.unconstrained_dim
        config["noise_features"] = (self.net["noise_features"] or max(2 * prep.space.unconstrained_dim, 8)) + self.net["noise_bits"]
        rl = ratio_loss(self.critic_loss)
        with _Seeded(seed, self.device):
            post = ImplicitPosterior(prep.space, prep.observed, prep.x_shapes, config, self.embedding).to(self.device)
            x = prep.x_on(self.device)
            u_s = post.fit_standardizers(prep.x, prep.u.to(self.device))
            summary = {}
            residual = post.fit_residual(x, u_s, auto=self.linear_residual == "auto")
            if residual is not None:
                summary["linear_residual"] = residual
            if post.residual is not None:  # the generator and the critics work on θ's linear residual
                with torch.no_grad():
                    u_s = torch.cat([post.residual(post.regressors(x[i]), u_s[i])
                                     for i in torch.arange(len(x), device=u_s.device).split(4096)])
            if post.generator.locate is not None:
                summary["locate"] = self._fit_location(post, x, u_s, loop, seed, progress, checkpoint)
            gen_params = list(post.context.parameters()) + [p for p in post.generator.parameters() if p.requires_grad]
            co_critic = Critic(prep.space.unconstrained_dim, post.context.out_features, self.net["critic_hidden"],
                               self.net["critic_layers"]).to(self.device)
            co_opt = torch.optim.Adam(co_critic.parameters(), lr=self.loop.lr, betas=(0.5, 0.999))
            m = self.num_draws

            def gen_step(idx, g):
                c = post.context(x[idx])
                draws = post._draw_standardized(c, m, g)
                losses = {"score": self._score(draws, u_s[idx])}
                if self.adversarial_weight > 0:
                    fake = draws[:, 0]
                    # critic step on detached draws, then the generator's non-saturating loss
                    cd = c.detach()
                    critic_loss = rl.loss(co_critic(cd, u_s[idx]), co_critic(cd, fake.detach()))
                    co_opt.zero_grad(set_to_none=True)
                    critic_loss.backward()
                    co_opt.step()
                    adv = F.softplus(-co_critic(c, fake)).mean()
                    losses = {"loss": losses["score"] + self.adversarial_weight * adv, **losses,
                              "critic": critic_loss.detach()}
                else:
                    losses = {"loss": losses["score"]}
                return losses

            val_g = torch.Generator(device=self.device)

            def gen_validate(idx):
                val_g.manual_seed(seed + 1)
                return float(sum(energy_score(post._draw_standardized(post.context(x[i]), m, val_g), u_s[i]).sum()
                                 for i in idx.split(2048)) / len(idx))

            ckpt = None if checkpoint is None else f"{checkpoint}.generator"
            gen_summary = train({"context": post.context, "generator": post.generator, "co_critic": co_critic}, gen_step,
                                gen_validate, len(x), loop, seed=seed, progress=progress, checkpoint=ckpt,
                                desc="ImplicitVI generator", parameters=gen_params)
            summary["generator"] = gen_summary
            if self.correction == "sir":
                for p in gen_params:
                    p.requires_grad_(False)
                c_all = _Contexts(post, x)  # the generator is frozen: e(y) and frames cached where they fit

                kq, contrastive = self.correction_negatives, self.correction_loss == "contrastive"
                c_loss = rl if self.correction_loss is None else (None if contrastive else ratio_loss(self.correction_loss))

                def critic_outputs(idx, g):
                    c, frame = c_all[idx]
                    with torch.no_grad():
                        fake = post._draw_standardized(c, kq, g)  # (b, K, d): K generator draws per y
                    return post.log_ratio(c, u_s[idx], frame), post.log_ratio(c, fake, frame)

                def critic_step(idx, g):
                    v_p, v_q = critic_outputs(idx, g)
                    loss = contrastive_loss(v_p, v_q) if contrastive else c_loss.loss(v_p, v_q.reshape(-1))
                    return {"ratio_loss": loss}

                def critic_validate(idx):
                    val_g.manual_seed(seed + 2)
                    total = 0.0
                    for i in idx.split(4096):
                        v_p, v_q = critic_outputs(i, val_g)
                        total += float(contrastive_loss(v_p, v_q) if contrastive else
                                       logistic_loss(v_p, v_q.reshape(-1))) * len(i)
                    return total / len(idx)

                ckpt = None if checkpoint is None else f"{checkpoint}.critic"
                summary["critic"] = train({"critic": post.critic}, critic_step, critic_validate, len(x), critic_settings,
                                          seed=seed + 1, progress=progress, checkpoint=ckpt,
                                          desc="ImplicitVI critic")
                for p in gen_params:
                    p.requires_grad_(True)
                summary["correction_selection"] = self._select_temperature(post, c_all, u_s, critic_settings, seed)
                post.config["temperature"] = min(summary["correction_selection"], key=summary["correction_selection"].get)
            post.generator.requires_grad_(True)  # the location net was frozen after stage 0
            post.training_summary = summary
        return post.attach_model(self.model, self.model_args, self.model_kwargs)

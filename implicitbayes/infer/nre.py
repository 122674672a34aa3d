r"""Neural ratio estimation with Pyro's MCMC (Hermans, Begy & Louppe 2020; Durkan et al. 2020).

A classifier d(θ, y) separates joint pairs (θ_i, y_i) ~ p(θ, y) (label 1) from marginal pairs
(θ_j, y_i) ~ p(θ) p(y) (label 0, θ shuffled within the batch). With the logistic loss its logit
converges to

    r*(θ, y) = log p(θ, y) / (p(θ) p(y)) = log p(y | θ) − log p(y),

so p(θ | y) ∝ p(θ) exp r*(θ, y). Sampling runs Pyro's NUTS on the original model, whose observed
implicit sites get the log-density r(θ, y_obs) through :class:`~implicitbayes.handlers.RatioLikelihood`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import pyro
import torch
from torch import nn

from ..handlers import replace_likelihood
from ..losses import logistic_loss
from ..nn import Critic
from ..simulate import _Seeded
from ..space import ParameterSpace
from .base import Method, NeuralPosterior, observed_values, register_posterior
from .training import TrainConfig, train

__all__ = ["NRE", "NREPosterior"]


@register_posterior
class NREPosterior(NeuralPosterior):
    """p(θ) exp r(θ, y), sampled with NUTS on the model; ``log_ratio`` exposes r."""

    method = "nre"

    def __init__(self, space: ParameterSpace, observed, x_shapes, config: Mapping[str, Any],
                 embedding: nn.Module | None = None, model: Callable | None = None):
        super().__init__(space, observed, x_shapes, config, embedding)
        self.classifier = Critic(space.unconstrained_dim, self.context.out_features, config["hidden"], config["layers"])
        self.model, self.model_args, self.model_kwargs = model, (), {}
        self.chains: dict[str, torch.Tensor] = {}

    def log_ratio(self, theta: Mapping[str, torch.Tensor], observed: Any = None) -> torch.Tensor:
        """r(θ, y) for latents ``{site: (n, *shape)}``: ``(n,)``, differentiable in θ."""
        x = self._observation(observed)
        u = self.space.to_unconstrained(theta)
        return self.classifier(self.context(x).expand(u.shape[0], -1), self.theta_standardize(u))

    def sample(self, num_samples: int, observed: Any = None, *, seed: int | None = None, num_chains: int | None = None,
               warmup_steps: int | None = None) -> dict[str, torch.Tensor]:
        """NUTS on the model with the learned likelihood; ``self.chains`` keeps the draws by chain."""
        if self.model is None:
            raise ValueError("this NRE posterior has no model to run MCMC on (loaded from a file?): "
                             "set posterior.model = model")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples <= 0:
            raise ValueError(f"num_samples: expected a positive integer, got {num_samples!r}")
        chains = num_chains or self.config["num_chains"]
        values = observed_values(observed if observed is not None else self.default_observed, self.observed,
                                 self.x_shapes, self.device, torch.get_default_dtype())

        def log_ratio(latents, observed_now):
            return self.log_ratio({k: v[None] for k, v in latents.items()}, observed_now)[0]

        conditioned = replace_likelihood(self.model, log_ratio, values, self.space.names)
        per_chain = -(-num_samples // chains)
        runs = []
        # chains run one after another: Pyro's parallel chains need a picklable model
        with _Seeded(seed if seed is not None else int(torch.randint(0, 2**62, ())), self.device):
            for _ in range(chains):
                mcmc = pyro.infer.MCMC(pyro.infer.NUTS(conditioned), num_samples=per_chain,
                                       warmup_steps=warmup_steps or self.config["warmup"], disable_progbar=True)
                mcmc.run(*self.model_args, **self.model_kwargs)
                runs.append(mcmc.get_samples())
        self.chains = {k: torch.stack([r[k] for r in runs]) for k in self.space.names}  # (chains, draws, ...)
        return {k: v.reshape((-1,) + v.shape[2:])[:num_samples] for k, v in self.chains.items()}

    def diagnostics(self) -> dict:
        """Split R-hat and effective sample size per site of the last ``sample`` run."""
        if not self.chains:
            raise ValueError("diagnostics: call sample() first")
        from pyro.infer.mcmc.util import diagnostics

        return diagnostics(self.chains, group_by_chain=True)


class NRE(Method):
    """Neural ratio estimation; sampling by NUTS on the model (module docstring).

    Options: ``hidden``, ``layers`` of the classifier, ``embedding``, ``num_chains`` and
    ``warmup`` for MCMC, and the loop's ``batch_size``, ``lr``, ``patience``, ``device``.
    """

    def __init__(self, model: Callable, *, observed: str | Sequence[str], model_args: tuple = (),
                 model_kwargs: Mapping | None = None, hidden: int = 128, layers: int = 3,
                 embedding: nn.Module | None = None, num_chains: int = 2, warmup: int = 300, batch_size: int = 256,
                 lr: float = 1e-3, max_steps: int = 20_000, patience: int = 20, validate_every: int | None = None,
                 validation_fraction: float = 0.1, device: str | torch.device | None = None):
        super().__init__(model, observed, model_args, model_kwargs, embedding,
                         TrainConfig(batch_size=batch_size, lr=lr, max_steps=max_steps, patience=patience,
                                     validate_every=validate_every, validation_fraction=validation_fraction), device)
        self.net = {"hidden": hidden, "layers": layers, "num_chains": num_chains, "warmup": warmup}

    def fit(self, data, *, max_steps: int | None = None, time_budget: float | None = None, seed: int | None = None,
            progress: bool = True, checkpoint=None) -> NREPosterior:
        """Train on a SimulationSet; returns an :class:`NREPosterior` (sampled by NUTS)."""
        prep, seed, loop = self._begin(data, max_steps, time_budget, seed)
        config = self._config(prep, **self.net)
        with _Seeded(seed, self.device):
            post = NREPosterior(prep.space, prep.observed, prep.x_shapes, config, self.embedding, self.model).to(self.device)
            post.model_args, post.model_kwargs = self.model_args, self.model_kwargs
            x = prep.x_on(self.device)
            u_s = post.fit_standardizers(prep.x, prep.u.to(self.device))

            def loss(idx, g):
                c = post.context(x[idx])
                shuffled = u_s[idx][torch.randperm(len(idx), generator=g)]
                return logistic_loss(post.classifier(c, u_s[idx]), post.classifier(c, shuffled))

            def step(idx, g):
                return {"logistic": loss(idx, g)}

            val_g = torch.Generator()

            def validate(idx):
                val_g.manual_seed(seed + 1)
                return float(loss(idx, val_g))

            post.training_summary = train({"posterior": post}, step, validate, len(x), loop, seed=seed,
                                          progress=progress, checkpoint=checkpoint, desc="NRE")
        return post

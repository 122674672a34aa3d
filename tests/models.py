"""Small Pyro models shared by the tests (module-level so process pools can pickle them)."""

import numpy as np
import pyro
import pyro.distributions as dist
import torch

import implicitbayes as ib


def gaussian_simulator(theta):
    return theta + 0.1 * torch.randn_like(theta)


def gaussian_model():
    theta = pyro.sample("theta", dist.Uniform(-torch.ones(2), torch.ones(2)).to_event(1))
    return pyro.sample("x", ib.Implicit(gaussian_simulator, theta, event_shape=(2,)))


def normal_simulator(theta):
    return theta + 0.5 * torch.randn_like(theta)


def normal_model():
    """θ ~ N(0, I₂), x ~ N(θ, 0.5² I): p(θ | x) = N(0.8 x, 0.2 I)."""
    theta = pyro.sample("theta", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    return pyro.sample("x", ib.Implicit(normal_simulator, theta, event_shape=(2,)))


def nan_simulator(theta):
    """NaN output wherever theta[..., 0] > threshold."""
    x = theta + 0.1 * torch.randn_like(theta)
    return torch.where(theta[:, :1] > 0.6, torch.full_like(x, float("nan")), x)


def partly_invalid_model():
    theta = pyro.sample("theta", dist.Uniform(-torch.ones(2), torch.ones(2)).to_event(1))
    return pyro.sample("x", ib.Implicit(nan_simulator, theta, event_shape=(2,)))


def mostly_invalid_model():
    theta = pyro.sample("theta", dist.Uniform(-torch.ones(2), torch.ones(2)).to_event(1))
    return pyro.sample("x", ib.Implicit(lambda t: torch.where(t[:, :1] > -0.8, float("inf"), t), theta,
                                        event_shape=(2,)))


def raising_simulator(theta):
    if (theta[:, 0] > 0.9).any():
        raise RuntimeError("simulator exploded")
    return theta.clone()


def raising_model():
    theta = pyro.sample("theta", dist.Uniform(-torch.ones(2), torch.ones(2)).to_event(1))
    return pyro.sample("x", ib.Implicit(raising_simulator, theta, event_shape=(2,)))


def numpy_scalar_simulator(theta):
    """Unbatched numpy code: theta (2,) -> (3,)."""
    t = np.asarray(theta)
    return torch.as_tensor(np.array([t[0], t[1], t[0] * t[1]]) + np.random.normal(0, 0.01, 3), dtype=torch.float32)


def numpy_model():
    theta = pyro.sample("theta", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    return pyro.sample("x", ib.Implicit(numpy_scalar_simulator, theta, event_shape=(3,), vectorized=False))


def hierarchical_model(num_groups=4):
    """Global mu; local implicit z (a latent Implicit site); implicit x per group."""
    groups = pyro.plate("groups", num_groups)
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with groups:
        z = pyro.sample("z", ib.Implicit(lambda m: m + torch.randn_like(m), mu))
        return pyro.sample("x", ib.Implicit(lambda t: t[:, None] + 0.1 * torch.randn(t.shape[0], 3), z,
                                            event_shape=(3,)))


def sleepy_simulator(theta):
    import time

    time.sleep(0.1)
    return theta + 0.1 * torch.randn_like(theta)


def sleepy_model():
    theta = pyro.sample("theta", dist.Uniform(-torch.ones(2), torch.ones(2)).to_event(1))
    return pyro.sample("x", ib.Implicit(sleepy_simulator, theta, event_shape=(2,)))


_flaky_calls = [0]


def flaky_simulator(theta):
    """Fails on every other call, whatever its input: a transient fault (a lost licence, a
    crashed external process). Draws its noise after the check, so a retry reproduces exactly
    what an undisturbed call would have returned."""
    _flaky_calls[0] += 1
    if _flaky_calls[0] % 2:
        raise OSError("transient failure")
    return gaussian_simulator(theta)


def flaky_model():
    theta = pyro.sample("theta", dist.Uniform(-torch.ones(2), torch.ones(2)).to_event(1))
    return pyro.sample("x", ib.Implicit(flaky_simulator, theta, event_shape=(2,)))

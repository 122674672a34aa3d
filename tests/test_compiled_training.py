"""The compiled training step (``TrainConfig.compile``): NPE's and NLE's maximum-likelihood step
run by ``torch.compile`` trains as the eager step does; ``"auto"`` leaves short runs eager and
bit for bit unchanged; a compiled step that fails or whose gradients are wrong is dropped with a
warning; an interrupted compiled run resumes exactly."""

import pytest
import torch

import implicitbayes as ib
from implicitbayes.infer import training
from tests.models import gaussian_model

X = torch.tensor([0.3, -0.2])


@pytest.fixture(scope="module")
def data():
    return ib.simulate(gaussian_model, 500, observed="x", seed=0, progress=False)


def fit(data, method=ib.NPE, checkpoint=None, **loop):
    # a small flow: its compile takes seconds
    m = method(gaussian_model, observed="x", transforms=1, hidden_features=(16,),
               training={"validate_every": 25, **loop})
    return m.fit(data, seed=3, max_steps=100, progress=False, checkpoint=checkpoint)


def draws(post):
    return post.sample(200, X, seed=0)["theta"]


@pytest.fixture(scope="module")
def eager(data):
    return fit(data, compile=False)


@pytest.mark.parametrize("method", [ib.NPE, ib.NLE])
def test_the_compiled_step_trains_as_the_eager_one(data, method):
    a, b = fit(data, method, compile=False), fit(data, method, compile=True)
    assert not a.training_summary["compiled"] and b.training_summary["compiled"]
    # float rounding differs between the two (fused kernels), so the runs agree closely, not exactly
    va = torch.tensor([h["validation"] for h in a.training_summary["history"]])
    vb = torch.tensor([h["validation"] for h in b.training_summary["history"]])
    assert len(va) == len(vb) == 4 and (va - vb).abs().max() < 1e-3, (va, vb)


def test_auto_leaves_a_short_run_eager_and_unchanged(data, eager):
    post = fit(data)  # "auto": 100 steps of a tiny flow are far from repaying a compile
    assert not post.training_summary["compiled"]
    assert torch.equal(draws(post), draws(eager))


def test_auto_decides_the_same_on_a_slow_machine(data, eager, monkeypatch):
    """"auto" estimates the eager pace from what the first step does, not from the clock: a
    machine on which every step seems to take a second (the clock patched to jump ahead a second
    each time it is read) trains the same short run eagerly, to the same weights — a compiled
    step would round differently."""
    clock = iter(range(10**6))
    monkeypatch.setattr(training.time, "perf_counter", lambda: float(next(clock)))
    post = fit(data)
    assert not post.training_summary["compiled"]
    assert torch.equal(draws(post), draws(eager))


def test_the_estimated_pace_counts_the_step():
    """The first step's counts: a step of a wider flow on a larger batch does more of each kind
    of work, and counting the same step again gives the same counts."""
    def counts(width, batch):
        flow = ib.nn.build_flow("maf", 2, 2, transforms=1, hidden_features=(width,))
        x, c = torch.randn(batch, 2), torch.randn(batch, 2)
        with training._StepCost() as cost:
            (-ib.nn.flow_log_prob(flow, x, c).mean()).backward()
        return cost.operations, cost.flops.get_total_flops(), cost.elements, cost.seconds()

    small, again, large = counts(16, 50), counts(16, 50), counts(256, 1000)
    assert small == again
    assert small[0] == large[0] and all(a < b for a, b in zip(small[1:], large[1:]))


def _patched_compile(monkeypatch, make):
    def compile(self):
        self.compiled = make(self.step)
    monkeypatch.setattr(training._Step, "compile", compile)


def test_a_compiled_step_with_wrong_gradients_is_dropped(data, eager, monkeypatch):
    # the loss of the eager step with its gradient 1.5× too large: what a miscompiled backward gives
    _patched_compile(monkeypatch, lambda step: lambda batch, g: {
        k: v + 0.5 * (v - v.detach()) for k, v in step(batch, g).items()})
    with pytest.warns(RuntimeWarning, match="gradients differ from the eager step's"):
        post = fit(data, compile=True)
    assert not post.training_summary["compiled"]
    assert torch.equal(draws(post), draws(eager))


def test_a_compiled_step_that_fails_is_dropped(data, eager, monkeypatch):
    def failing(step):
        def run(batch, g):
            raise RuntimeError("no C++ compiler found")
        return run
    _patched_compile(monkeypatch, failing)
    with pytest.warns(RuntimeWarning, match="failed .RuntimeError: no C.. compiler found"):
        post = fit(data, compile=True)
    assert not post.training_summary["compiled"]
    assert torch.equal(draws(post), draws(eager))


def test_auto_compiles_a_long_run_and_an_interrupted_one_resumes_exactly(data, tmp_path, monkeypatch):
    monkeypatch.setattr(training, "COMPILE_PAYS_OFF", 0.0)  # every run counts as long
    a = fit(data)
    assert a.training_summary["compiled"]  # decided after the first epoch (25 steps)

    ckpt, real_step, calls = tmp_path / "run.ckpt", torch.optim.Adam.step, {"n": 0}

    def interrupting_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 60:
            raise KeyboardInterrupt  # after the checkpoint written at step 50
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", interrupting_step)
    with pytest.raises(KeyboardInterrupt):
        fit(data, checkpoint=ckpt)
    monkeypatch.setattr(torch.optim.Adam, "step", real_step)
    monkeypatch.setattr(training, "COMPILE_PAYS_OFF", float("inf"))  # the checkpoint's decision stands
    c = fit(data, checkpoint=ckpt)
    assert c.training_summary["compiled"]
    assert torch.equal(draws(a), draws(c))


def test_compile_on_a_step_that_draws_is_refused_with_a_warning(data):
    with pytest.warns(RuntimeWarning, match="compile=True is not used: this step draws random numbers"):
        post = ib.NRE(gaussian_model, observed="x", training={"compile": True}).fit(data, seed=0, max_steps=5,
                                                                                   progress=False)
    assert not post.training_summary["compiled"]

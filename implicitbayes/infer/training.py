"""The one training loop every method uses: minibatches, a validation split, early stopping,
``max_steps`` / ``time_budget``, a tqdm bar with the current losses, resumable checkpoints
(safetensors + JSON, no pickle), and a NaN/inf guard that restores the best weights.

A method supplies ``step(batch, generator) -> {name: loss}`` (the first entry is optimised, the
others are shown) and ``validate(batch) -> float`` (lower is better). Everything random in the
loop draws from one seeded ``torch.Generator``; with a seed, training is deterministic and a
resumed run continues exactly where the interrupted one stopped.

A step that draws nothing (NPE's and NLE's maximum likelihood) may be run compiled by
``torch.compile`` (``TrainConfig.compile``): a step of a small flow at batch 50 is bound by the
per-operation overhead of eager PyTorch, which a compiled forward and backward remove (3–4× fewer
seconds a step on one CPU thread), for a one-off compile of tens of seconds. ``"auto"`` compiles
on the CPU when the run is long enough to repay that: after the first epoch, if the fewest steps
the run can still take (``patience`` epochs) would last at least :data:`COMPILE_PAYS_OFF` seconds
at the eager pace. That pace is not timed but estimated from what the first step does — the
operations it dispatches, their floating-point work and the numbers they write
(:class:`_StepCost`) — so that the decision, and with it the trained weights to the bit, is the
same on a loaded machine as on an idle one: a compiled step rounds differently from the eager
one. Where compiling fails (no C++ compiler, an operation the compiler cannot take) the loop
warns once and goes on eagerly.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..checks import decay, flag, flag_or_auto, integer, number
from ..errors import FormatError, TrainingError
from ..io import load_tensors, save_tensors, unlink_stale_temporaries
from ..seeding import fresh_seed

__all__ = ["TrainConfig", "train", "resolve_training"]

_CKPT_KIND = "implicitbayes.Checkpoint"
_CKPT_VERSION = 1


@dataclass
class TrainConfig:
    """The training loop's settings. Every method has its own defaults (``NPE.TRAINING``, …);
    pass ``training=TrainConfig(...)`` to replace them, or a mapping of fields to change some
    (``training={"lr": 1e-4}``). ``batch_size="auto"`` sizes the batch to the training rows
    (:func:`auto_batch_size`) and reads ``lr`` and ``max_steps`` as settings for batches of 50,
    scaled to the batch chosen (:func:`scaled_to_batch`)."""

    batch_size: int | str = 256  # or "auto": auto_batch_size(training rows), lr and max_steps scaled to it
    lr: float = 1e-3
    max_steps: int = 20_000
    validation_fraction: float = 0.1
    validate_every: int | None = None  # steps between validations; None: one epoch (≥ 10 steps)
    patience: int = 20  # validations without improvement before stopping
    # stop sooner, after this many validations without improvement, where their losses rise
    # steadily (overfitting that more patience does not undo; :func:`rising`); None: never
    rising_patience: int | None = None
    weight_decay: float = 0.0
    clip_grad_norm: float | None = 5.0
    lr_decay: bool = True  # cosine decay over max_steps
    plateau: int | None = None  # halve the learning rate after this many validations without improvement
    ema: float | None = None  # validate and keep an exponential moving average of the weights (Polyak averaging)
    restore_best: bool = True  # end on the best validated weights (else on the last ones)
    time_budget: float | None = None  # seconds
    compile: bool | str = "auto"  # run a compilable step by torch.compile: True, False, or "auto" (module docstring)

    def __post_init__(self):
        if self.batch_size != "auto":
            try:
                integer("batch_size", self.batch_size)
            except ValueError:
                raise ValueError(f"batch_size: expected a positive integer or 'auto', got {self.batch_size!r}") from None
        integer("max_steps", self.max_steps)
        integer("patience", self.patience)
        integer("plateau", self.plateau, none=True)
        integer("rising_patience", self.rising_patience, none=True, minimum=3)
        integer("validate_every", self.validate_every, none=True)
        number("lr", self.lr)
        number("validation_fraction", self.validation_fraction, low=0.0, high=1.0, closed=True, what="a fraction in [0, 1)")
        number("weight_decay", self.weight_decay, high=math.inf, closed=True, what="a non-negative number")
        number("clip_grad_norm", self.clip_grad_norm, none=True)
        flag("lr_decay", self.lr_decay)
        flag("restore_best", self.restore_best)
        decay("ema", self.ema)
        number("time_budget", self.time_budget, none=True, what="a positive number of seconds")
        flag_or_auto("compile", self.compile)

    def with_fit(self, max_steps: int | None, time_budget: float | None) -> "TrainConfig":
        """A copy with one fit's ``max_steps`` (if given) and ``time_budget``."""
        integer("max_steps", max_steps, none=True)
        number("time_budget", time_budget, none=True, what="a positive number of seconds")
        return replace(self, max_steps=max_steps or self.max_steps, time_budget=time_budget)


# "auto" compiles when the fewest steps left would take this many seconds eagerly: a cold
# compile of NPE's default flow takes 25–60 s on one core of a 2-core machine and the compiled
# step runs in about a third of the eager one's time, so the compile is repaid by the time it
# saves on the fewest steps, and about twice over on a typical run (2–3× the fewest steps)
COMPILE_PAYS_OFF = 60.0


class _StepCost(TorchDispatchMode):
    """What one eager step does, counted as it runs (forward, backward): the operations it
    dispatches, their floating-point work (matrix products, ``FlopCounterMode``'s count) and the
    numbers they write. :meth:`seconds` is the eager step's pace on one CPU thread, estimated
    from those counts — the same for the same step whatever else the machine is doing. The
    three rates are a least-squares fit (in relative error) to whole steps — forward, backward,
    gradient clipping, Adam — of the library's flows (MAF and NSF, 2–42 features, hidden widths
    50–256, batches 50–1 024) timed on one thread of a busy 2-core machine, the benchmarks'
    setting; each estimate is within 30 % of the step's time."""

    SECONDS_PER_OPERATION = 1.4e-5  # eager PyTorch's overhead: dispatch, autograd bookkeeping
    SECONDS_PER_FLOP = 2.5e-11
    SECONDS_PER_ELEMENT = 1.4e-9  # elementwise work (splines, activations), by the numbers written

    def __init__(self):
        super().__init__()
        self.operations = self.elements = 0
        from torch.utils.flop_counter import FlopCounterMode

        self.flops = FlopCounterMode(display=False)

    def __enter__(self):
        self.flops.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self.flops.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.operations += 1
        self.elements += sum(t.numel() for t in (out if isinstance(out, (tuple, list)) else (out,))
                             if isinstance(t, torch.Tensor))
        return out

    def seconds(self) -> float:
        return (self.SECONDS_PER_OPERATION * self.operations + self.SECONDS_PER_FLOP * self.flops.get_total_flops()
                + self.SECONDS_PER_ELEMENT * self.elements)


class _Step:
    """The loop's step, eager or compiled (``TrainConfig.compile``, module docstring).

    ``run(batch, generator)`` runs the step and the backward pass and returns the step's losses.
    The compiled step is built with ``dynamic=False`` (every batch has the same shape). NPE's and
    NLE's steps trace as one graph (their flows' density is :func:`~implicitbayes.nn.flow_log_prob`);
    a user's own flow may break into several, which still runs. Its first call runs under a guard,
    and a failure there is a warning and an eager step instead; so is a compiled step whose
    loss or gradients differ from the eager step's on that batch. Each compile
    traces a fresh copy of the step's code, so that a process fitting many times (rounds, SBC,
    a test suite) neither reuses another fit's graph nor runs into Dynamo's recompile limit."""

    def __init__(self, step: Callable, setting: bool | str, compilable: bool, device: torch.device, desc: str):
        self.step, self.desc = step, desc
        if setting is True and not compilable:
            import warnings

            warnings.warn(f"{desc}: compile=True is not used: this step draws random numbers, which a compiled "
                          "graph cannot take from the loop's generator; only NPE's and NLE's steps are compiled",
                          RuntimeWarning, stacklevel=3)
        self.setting = setting if compilable else False
        if self.setting == "auto" and device.type != "cpu":
            self.setting = False  # compiled training is verified on the CPU only
        self.compiled: Callable | None = None
        self.failed = self.decided = self.checked = False
        self.pace: float | None = None  # the eager step's estimated seconds (_StepCost), for "auto"
        if self.setting is True:
            self.decided = True
            self.compile()

    @property
    def is_compiled(self) -> bool:
        return self.compiled is not None and not self.failed

    def compile(self) -> None:
        import types

        code = self.step.__code__.replace()  # a new code object: Dynamo's cache of this fit alone
        fresh = types.FunctionType(code, self.step.__globals__, self.step.__name__, self.step.__defaults__,
                                   self.step.__closure__)
        # cpp.simdlen 1: scalar C++ loops; torch 2.13's vectorised ones gave the spline flows'
        # backward wrong gradients (caught by the check of the first step) and were not faster
        # size_asserts off: the compiled wrapper re-checks every buffer's size and stride on each
        # call (hundreds of checks a step), which with dynamic=False and one batch shape are fixed
        self.compiled = torch.compile(fresh, dynamic=False, options={"cpp.simdlen": 1, "size_asserts": False})

    def decide(self, steps_left: int, seconds_left: float) -> None:
        """After the first epoch, for "auto": compile when the fewest steps left at the eager pace
        (estimated from the first step's counts) would take at least COMPILE_PAYS_OFF seconds."""
        if self.decided or self.setting is False:
            return
        self.decided = True
        if min((self.pace or 0.0) * steps_left, seconds_left) >= COMPILE_PAYS_OFF:
            self.compile()

    def run(self, batch: torch.Tensor, generator, optimizer: torch.optim.Optimizer) -> Mapping[str, torch.Tensor]:
        """The step's losses, with the gradients of the first one in the parameters' ``.grad``."""
        if not self.is_compiled:
            if self.decided or self.setting is False or self.pace is not None:
                return self._backward(self.step(batch, generator), optimizer)
            with _StepCost() as cost:  # the first eager step of an undecided "auto" run, counted
                losses = self._backward(self.step(batch, generator), optimizer)
            self.pace = cost.seconds()
            return losses
        if self.checked:
            return self._backward(self.compiled(batch, None), optimizer)  # a compilable step draws nothing
        return self._first_compiled(batch, generator, optimizer)

    def _first_compiled(self, batch, generator, optimizer) -> Mapping[str, torch.Tensor]:
        """The first compiled step, checked against the eager one on the same batch: the same
        loss, and gradients within 10⁻³ of the eager ones (relative, per tensor). A compiled step
        that fails or disagrees is dropped with a warning (torch 2.13's vectorised CPU code gave
        zuko's spline flows gradients 10–35 % off, with the loss right) and the eager one is used."""
        import warnings

        params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        eager = self.step(batch, generator)
        want = torch.autograd.grad(next(iter(eager.values())), params, allow_unused=True)
        reason = None
        try:
            compiled = self.compiled(batch, None)
            got = torch.autograd.grad(next(iter(compiled.values())), params, allow_unused=True)
        except Exception as e:  # noqa: BLE001 — any failure of the compiler stack: go on eagerly
            text = str(e).strip()
            reason = f"it failed ({type(e).__name__}: {text.splitlines()[0] if text else ''})"
        else:
            reason = _disagreement(eager, compiled, want, got)
        self.checked = True
        if reason is not None:
            self.failed = True
            warnings.warn(f"{self.desc}: the compiled training step is not used: {reason}; training goes on "
                          "without it (TrainConfig.compile=False skips the attempt)", RuntimeWarning, stacklevel=4)
        optimizer.zero_grad(set_to_none=True)
        for p, g in zip(params, want if reason is not None else got):
            if g is not None:
                p.grad = g
        return eager if reason is not None else compiled

    @staticmethod
    def _backward(losses: Mapping[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> Mapping[str, torch.Tensor]:
        """The gradients of the first loss, where it is finite (the loop stops on one that is not)."""
        loss = next(iter(losses.values()))
        if torch.isfinite(loss):
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        return losses


def _disagreement(eager: Mapping, compiled: Mapping, want: tuple, got: tuple, tol: float = 1e-3) -> str | None:
    """Why a compiled step's losses and gradients are not the eager step's, or None where they agree."""
    a, b = (float(next(iter(losses.values())).detach()) for losses in (eager, compiled))
    if not math.isfinite(a):
        return None  # the loop stops on this loss either way
    if not abs(a - b) <= tol * max(1.0, abs(a)):
        return f"its loss {b:.6g} differs from the eager step's {a:.6g}"
    total = math.sqrt(sum(float(w.square().sum()) for w in want if w is not None))
    for i, (w, g) in enumerate(zip(want, got)):
        if (w is None) != (g is None):
            return f"parameter {i} has a gradient in one of the two steps only"
        if w is not None:
            err, size = float((g - w).norm()), float(w.norm())
            if not err <= tol * size + 1e-6 * total:
                return f"its gradients differ from the eager step's (parameter {i}: relative error {err / max(size, 1e-30):.2g})"
    return None


RISING_T = 3.0  # standard errors of the least-squares slope that make a rise (``rising``)


def rising(values) -> bool:
    """Whether the validation losses ``values`` (consecutive validations, all without
    improvement) rise steadily: their least-squares slope against validation number is positive
    by at least :data:`RISING_T` standard errors. A flat or noisy stretch (a plateau the cosine
    decay may still leave) does not pass; an overfitting flow's steady climb does."""
    y = torch.tensor(values, dtype=torch.float64)
    k = len(y)
    if k < 3:
        return False
    t = torch.arange(k, dtype=torch.float64) - (k - 1) / 2
    slope = float((t * y).sum() / (t * t).sum())
    residual = y - y.mean() - slope * t
    se = math.sqrt(float(residual.square().sum()) / (k - 2) / float((t * t).sum()))
    return slope > 0 and (se == 0 or slope >= RISING_T * se)


AUTO_BATCH = (50, 200, 45)  # smallest, largest, steps per epoch aimed at in between


def auto_batch_size(rows: int) -> int:
    """``batch_size="auto"``: 50 rows per step up to 2 250 training rows, then about 45 steps per
    epoch (rows // 45), at most 200 — sbi's batch at 10⁴ simulations. Small sets keep many
    small steps per epoch; large ones stop paying per-step overhead for steps that small."""
    low, high, steps = AUTO_BATCH
    return max(low, min(high, rows // steps))


def scaled_to_batch(config: TrainConfig, rows: int) -> tuple[int, TrainConfig]:
    """The batch size a run on ``rows`` training rows uses, and its settings. With
    ``batch_size="auto"`` the learning rate and ``max_steps`` are read as settings for batches
    of 50 and scaled to the batch B chosen: the rate by √(B/50) (the square-root rule for Adam,
    Malladi et al. 2022), the steps by 50/B, so that the cosine decay spans the same epochs."""
    if config.batch_size != "auto":
        return config.batch_size, config
    batch = auto_batch_size(rows)
    ratio = batch / AUTO_BATCH[0]
    return batch, replace(config, lr=config.lr * math.sqrt(ratio), max_steps=max(1, math.ceil(config.max_steps / ratio)))


def resolve_training(default: TrainConfig, training: "TrainConfig | Mapping[str, Any] | None",
                     name: str = "training") -> TrainConfig:
    """A method's loop settings: its ``default``, replaced by a ``TrainConfig`` or changed by a
    mapping of field names to values."""
    if training is None:
        return default
    if isinstance(training, TrainConfig):
        return training
    if isinstance(training, Mapping):
        known = {f.name for f in fields(TrainConfig)}
        unknown = sorted(set(training) - known)
        if unknown:
            raise ValueError(f"{name}: unknown loop settings {unknown}; TrainConfig has {sorted(known)}")
        return replace(default, **training)
    raise TypeError(f"{name}: expected an ib.TrainConfig, a mapping of its fields or None, got {type(training).__name__}")


def split(n: int, fraction: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random (train, validation) split of ``range(n)``; at least one row in each.
    ``fraction=0`` validates on the training rows themselves (methods fitted to one dataset)."""
    if fraction == 0:
        perm = torch.randperm(n, generator=generator)
        return perm, perm
    if n < 2:
        raise ValueError(f"data: need at least 2 simulations to hold some out for validation, got {n}")
    perm = torch.randperm(n, generator=generator)
    n_val = min(max(1, int(round(n * fraction))), n - 1)
    return perm[n_val:], perm[:n_val]


def adam(groups, **options) -> torch.optim.Optimizer:
    """Adam as one fused kernel per step (``fused=True``: the update of every tensor in one C++
    or CUDA loop; on one CPU thread a small flow's step is a fifth shorter than with the
    ``foreach`` kernels, which run one pass per operation), else, where this torch or these
    tensors cannot (before torch 2.4 on the CPU, a parameter of an unsupported dtype), the
    ``foreach`` kernels — not the CPU default, which loops over the tensors in Python."""
    try:
        return torch.optim.Adam(groups, fused=True, **options)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.Adam(groups, foreach=True, **options)


def _state_tensors(modules: Mapping[str, nn.Module], optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {f"module.{k}.{p}": v for k, m in modules.items() for p, v in m.state_dict().items()}
    opt = optimizer.state_dict()
    for i, st in opt["state"].items():
        for key, v in st.items():
            out[f"optim.{i}.{key}"] = torch.as_tensor(v)
    return out


def _restore(tensors: dict, meta: dict, modules: Mapping[str, nn.Module], optimizer: torch.optim.Optimizer) -> None:
    for k, m in modules.items():
        prefix = f"module.{k}."
        m.load_state_dict({name[len(prefix):]: v for name, v in tensors.items() if name.startswith(prefix)})
    opt = optimizer.state_dict()
    state: dict = {}
    for name, v in tensors.items():
        if name.startswith("optim."):
            _, i, key = name.split(".", 2)
            state.setdefault(int(i), {})[key] = v
    opt["state"] = state
    optimizer.load_state_dict(opt)


def train(
    modules: Mapping[str, nn.Module],
    step: Callable[[torch.Tensor, torch.Generator], Mapping[str, torch.Tensor]],
    validate: Callable[[torch.Tensor], float],
    num_rows: int,
    config: TrainConfig,
    *,
    seed: int,
    progress: bool = True,
    checkpoint: str | os.PathLike | None = None,
    desc: str = "training",
    parameters: list | None = None,
    compilable: bool = False,
) -> dict:
    """Train ``modules`` on row indices ``0..num_rows-1``; returns a summary dict.

    ``step`` receives a tensor of training row indices (on the CPU) and the loop's generator, on
    the modules' device (it draws there: give ``device=generator.device`` to ``torch.randperm``); ``validate``
    receives the validation row indices. ``parameters`` may be Adam parameter groups; a group's
    ``lr_scale`` multiplies the scheduled learning rate. The best weights (by validation) are restored at the
    end. ``checkpoint`` is a file path: if it exists the run resumes from it (same settings
    required), and it is rewritten atomically at every validation. ``compilable``: ``step`` draws
    nothing and ``torch.compile`` may run it in one graph (``config.compile``, module docstring);
    a resumed run compiles where the interrupted one had.

    With ``config.ema = β`` the loop keeps an exponential moving average of the parameters,
    a ← β_t a + (1 − β_t) w after every step with β_t = min(β, (1 + t)/(10 + t)) (so the first
    steps do not anchor it at the initialisation); validation, the best weights and the final
    weights are those of the average (Polyak & Juditsky 1992): the optimiser's noise around an
    optimum averages out instead of being frozen in by wherever the last step landed.
    """
    g = torch.Generator().manual_seed(seed)
    train_idx, val_idx = split(num_rows, config.validation_fraction, g)
    batch_size, config = scaled_to_batch(config, len(train_idx))
    every = config.validate_every or max(10, math.ceil(len(train_idx) / batch_size))
    groups = parameters if parameters is not None else [p for m in modules.values() for p in m.parameters()]
    optimizer = adam(groups, lr=config.lr, weight_decay=config.weight_decay)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    # the steps draw their noise where the modules are: a CUDA draw cannot take the loop's CPU
    # generator, so on a GPU they get a generator of that device seeded from it (on the CPU, the same one)
    device = params[0].device if params else torch.device("cpu")
    g_step = g if device.type == "cpu" else torch.Generator(device).manual_seed(fresh_seed(g))
    stepper = _Step(step, config.compile, compilable, device, desc)

    def learning_rate(step: int) -> float:  # closed-form cosine decay to 1 %: resumes exactly
        if not config.lr_decay:
            return config.lr * scale
        return config.lr * scale * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(step, config.max_steps) / config.max_steps)))
    start, best, best_state, bad, history, scale = 0, math.inf, None, 0, [], 1.0
    average = [p.detach().clone() for p in params] if config.ema else []
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if ckpt is not None:
        unlink_stale_temporaries(ckpt)  # a previous run killed while writing it
    if ckpt is not None and ckpt.exists():
        tensors, meta = load_tensors(ckpt, kind=_CKPT_KIND, max_version=_CKPT_VERSION)
        if meta.get("num_rows") != num_rows or meta.get("seed") != seed or meta.get("desc") != desc:
            raise FormatError(f"{ckpt}: checkpoint of another training run (rows {meta.get('num_rows')}, seed "
                              f"{meta.get('seed')}, {meta.get('desc')!r}); delete it or use another path")
        try:
            _restore(tensors, meta, modules, optimizer)
            g.set_state(tensors["loop.generator"])
            if g_step is not g:
                g_step.set_state(tensors["loop.device_generator"])
            best_state = {k: v for k, v in tensors.items() if k.startswith("best.")}
            start, best, bad, history = meta["step"], meta["best"], meta["bad"], meta["history"]
            scale = meta.get("lr_scale", 1.0)
            if "compiled" in meta:  # the interrupted run's decision stands (an exact resume)
                stepper.decided = True
                if meta["compiled"] and stepper.setting is not False:
                    stepper.compile()
            for i, a in enumerate(average):
                a.copy_(tensors[f"ema.{i}"])
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise FormatError(f"{ckpt}: checkpoint does not fit this training run ({type(e).__name__}: {e}); "
                              "delete it or use another path") from e
    from tqdm.auto import tqdm

    def snapshot():
        return {f"best.{k}.{p}": v.detach().clone() for k, m in modules.items() for p, v in m.state_dict().items()}

    def restore_best():
        if best_state:
            for k, m in modules.items():
                prefix = f"best.{k}."
                m.load_state_dict({n[len(prefix):]: v for n, v in best_state.items() if n.startswith(prefix)})

    @torch.no_grad()
    def swap_average():  # exchange the live weights and their average (twice: back as they were)
        for p, a in zip(params, average):
            tmp = p.detach().clone()
            p.copy_(a)
            a.copy_(tmp)

    t0 = time.perf_counter()
    bar = tqdm(total=config.max_steps, initial=start, desc=desc, disable=not progress, leave=False)
    stopped = "max_steps"
    s = start
    try:
        for m in modules.values():
            m.train()
        for s in range(start, config.max_steps):
            batch = train_idx[torch.randint(0, len(train_idx), (min(batch_size, len(train_idx)),), generator=g)]
            losses = stepper.run(batch, g_step, optimizer)
            loss = next(iter(losses.values()))
            if not torch.isfinite(loss):
                restore_best()
                raise TrainingError(f"{desc}: the loss became {loss.item()} at step {s}; the best weights "
                                    f"(validation {best:.4g}) were restored. Lower the learning rate or check "
                                    "the data for extreme values.")
            if config.clip_grad_norm:
                nn.utils.clip_grad_norm_(params, config.clip_grad_norm)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(s) * group.get("lr_scale", 1.0)
            optimizer.step()
            if average:
                with torch.no_grad():
                    torch._foreach_lerp_(average, [p.detach() for p in params], 1.0 - min(config.ema, (1 + s) / (10 + s)))
            bar.update(1)
            if s + 1 - start == every:  # the first epoch of this run: compile or not
                stepper.decide(min(config.patience * every, config.max_steps - s - 1),
                               math.inf if config.time_budget is None else config.time_budget - (time.perf_counter() - t0))
            if (s + 1) % every == 0 or s + 1 == config.max_steps:
                for m in modules.values():
                    m.eval()
                swap_average()  # validate (and snapshot) the averaged weights
                with torch.no_grad():
                    val = float(validate(val_idx))
                history.append({"step": s + 1, "validation": val, **{k: float(v.detach()) for k, v in losses.items()}})
                bar.set_postfix({**{k: f"{float(v.detach()):.3g}" for k, v in losses.items()}, "val": f"{val:.4g}"})
                improved = not math.isfinite(best) or val < best - 1e-6 * abs(best)
                if improved:
                    best, bad, best_state = val, 0, snapshot()
                swap_average()
                for m in modules.values():
                    m.train()
                if not improved:
                    bad += 1
                    if config.plateau and bad % config.plateau == 0:
                        scale *= 0.5  # on a plateau: smaller steps (ReduceLROnPlateau)
                if ckpt is not None:
                    tensors = _state_tensors(modules, optimizer)
                    tensors.update(best_state or {})
                    tensors.update({f"ema.{i}": a for i, a in enumerate(average)})
                    tensors["loop.generator"] = g.get_state()
                    if g_step is not g:
                        tensors["loop.device_generator"] = g_step.get_state()
                    save_tensors(ckpt, tensors, kind=_CKPT_KIND, version=_CKPT_VERSION,
                                 meta={"step": s + 1, "best": best, "bad": bad, "history": history, "lr_scale": scale,
                                       "num_rows": num_rows, "seed": seed, "desc": desc, "compiled": stepper.is_compiled})
                if bad >= config.patience:
                    stopped = "early_stopping"
                    break
                if config.rising_patience and bad >= config.rising_patience and \
                        rising([h["validation"] for h in history[-config.rising_patience:]]):
                    stopped = "rising_validation"
                    break
                if config.time_budget is not None and time.perf_counter() - t0 > config.time_budget:
                    stopped = "time_budget"
                    break
    finally:
        bar.close()
    if config.restore_best:
        restore_best()
    elif average:
        swap_average()  # end on the averaged weights
    for m in modules.values():
        m.eval()
    return {"steps": s + 1, "batch_size": batch_size, "best_validation": best, "stopped": stopped, "seconds": time.perf_counter() - t0,
            "lr_scale": scale, "compiled": stepper.is_compiled, "history": history}

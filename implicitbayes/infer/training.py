"""The one training loop every method uses: minibatches, a validation split, early stopping,
``max_steps`` / ``time_budget``, a tqdm bar with the current losses, resumable checkpoints
(safetensors + JSON, no pickle), and a NaN/inf guard that restores the best weights.

A method supplies ``step(batch, generator) -> {name: loss}`` (the first entry is optimised, the
others are shown) and ``validate(batch) -> float`` (lower is better). Everything random in the
loop draws from one seeded ``torch.Generator``; with a seed, training is deterministic and a
resumed run continues exactly where the interrupted one stopped.
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

from ..checks import decay, flag, integer, number
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
    weight_decay: float = 0.0
    clip_grad_norm: float | None = 5.0
    lr_decay: bool = True  # cosine decay over max_steps
    plateau: int | None = None  # halve the learning rate after this many validations without improvement
    ema: float | None = None  # validate and keep an exponential moving average of the weights (Polyak averaging)
    restore_best: bool = True  # end on the best validated weights (else on the last ones)
    time_budget: float | None = None  # seconds

    def __post_init__(self):
        if self.batch_size != "auto":
            try:
                integer("batch_size", self.batch_size)
            except ValueError:
                raise ValueError(f"batch_size: expected a positive integer or 'auto', got {self.batch_size!r}") from None
        integer("max_steps", self.max_steps)
        integer("patience", self.patience)
        integer("plateau", self.plateau, none=True)
        integer("validate_every", self.validate_every, none=True)
        number("lr", self.lr)
        number("validation_fraction", self.validation_fraction, low=0.0, high=1.0, closed=True, what="a fraction in [0, 1)")
        number("weight_decay", self.weight_decay, high=math.inf, closed=True, what="a non-negative number")
        number("clip_grad_norm", self.clip_grad_norm, none=True)
        flag("lr_decay", self.lr_decay)
        flag("restore_best", self.restore_best)
        decay("ema", self.ema)
        number("time_budget", self.time_budget, none=True, what="a positive number of seconds")

    def with_fit(self, max_steps: int | None, time_budget: float | None) -> "TrainConfig":
        """A copy with one fit's ``max_steps`` (if given) and ``time_budget``."""
        integer("max_steps", max_steps, none=True)
        number("time_budget", time_budget, none=True, what="a positive number of seconds")
        return replace(self, max_steps=max_steps or self.max_steps, time_budget=time_budget)


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
) -> dict:
    """Train ``modules`` on row indices ``0..num_rows-1``; returns a summary dict.

    ``step`` receives a tensor of training row indices (on the CPU) and the loop's generator, on
    the modules' device (it draws there: give ``device=generator.device`` to ``torch.randperm``); ``validate``
    receives the validation row indices. ``parameters`` may be Adam parameter groups; a group's
    ``lr_scale`` multiplies the scheduled learning rate. The best weights (by validation) are restored at the
    end. ``checkpoint`` is a file path: if it exists the run resumes from it (same settings
    required), and it is rewritten atomically at every validation.

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
    optimizer = torch.optim.Adam(groups, lr=config.lr, weight_decay=config.weight_decay)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    # the steps draw their noise where the modules are: a CUDA draw cannot take the loop's CPU
    # generator, so on a GPU they get a generator of that device seeded from it (on the CPU, the same one)
    device = params[0].device if params else torch.device("cpu")
    g_step = g if device.type == "cpu" else torch.Generator(device).manual_seed(fresh_seed(g))

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
        for s in range(start, config.max_steps):
            for m in modules.values():
                m.train()
            batch = train_idx[torch.randint(0, len(train_idx), (min(batch_size, len(train_idx)),), generator=g)]
            losses = step(batch, g_step)
            loss = next(iter(losses.values()))
            if not torch.isfinite(loss):
                restore_best()
                raise TrainingError(f"{desc}: the loss became {loss.item()} at step {s}; the best weights "
                                    f"(validation {best:.4g}) were restored. Lower the learning rate or check "
                                    "the data for extreme values.")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.clip_grad_norm:
                nn.utils.clip_grad_norm_(params, config.clip_grad_norm)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(s) * group.get("lr_scale", 1.0)
            optimizer.step()
            if average:
                with torch.no_grad():
                    torch._foreach_lerp_(average, [p.detach() for p in params], 1.0 - min(config.ema, (1 + s) / (10 + s)))
            bar.update(1)
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
                                       "num_rows": num_rows, "seed": seed, "desc": desc})
                if bad >= config.patience:
                    stopped = "early_stopping"
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
            "lr_scale": scale, "history": history}

"""Small pieces every stage's loop uses: the stage context, data order, step budget, non-finite guard,
and the two set-up steps the single-engine stages (sft, rm, dpo) share: the engine with its step budget,
and the resume point with the evaluation before training."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.checkpoint import Checkpointer, ConfigRecord
from pipeline.config import ConfigError, RunConfig, SupervisedSection
from pipeline.dist import any_rank, dp_rank, dp_world_size, rank
from pipeline.engine import initialize, tp_degree
from pipeline.errors import UserError
from pipeline.resume import resume_stage


@dataclass
class StageContext:
    """What the runner hands a stage: the tokenizer, the models it starts from (name -> folder or hub
    id) and the config record its checkpoints are written under."""

    tokenizer: Any
    work_dir: Path
    inputs: dict[str, str] = field(default_factory=dict)
    config: ConfigRecord | None = None

    @property
    def is_main(self) -> bool:
        return rank() == 0


class NonFiniteLossError(UserError, RuntimeError):
    pass


class NonFiniteGuard:
    """Skip steps whose loss is NaN/inf; stop after `limit` in a row."""

    def __init__(self, limit: int = 5):
        self.limit, self.in_a_row, self.skipped = limit, 0, 0

    def ok(self, loss: torch.Tensor, where: str) -> bool:
        """Collective: every rank skips together (a rank that went on alone would hang in backward)."""
        if not any_rank(not bool(torch.isfinite(loss).all())):
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.skipped += 1
        if self.in_a_row >= self.limit:
            raise NonFiniteLossError(f"{where}: loss was not finite {self.in_a_row} updates in a row; stopping "
                                     f"(the last checkpoint is kept); lower the learning rate or check the data")
        return False


def steps_per_epoch(n_examples: int, micro_batch: int, grad_accum: int, tp: int = 1) -> int:
    """Optimizer steps in one pass over n_examples: each step takes micro_batch x grad_accum examples
    per data-parallel replica (world / tp of them: the ranks of a tensor-parallel group share theirs)."""
    return n_examples // (micro_batch * grad_accum * dp_world_size(tp))


# The micro-batch key of a stage section, where it is not per_device_train_batch_size (a PPO step
# is counted in generation batches).
MICRO_BATCH_KEY = {"stage.ppo": "per_device_generation_batch_size"}


def total_steps(n_examples: int, micro_batch: int, grad_accum: int, epochs: int, max_steps: int | None, where: str,
                tp: int = 1) -> int:
    """Optimizer steps of a stage; `where` is its config section (stage.sft), tp its tensor-parallel
    degree; ConfigError naming the micro-batch key when the data is smaller than one step."""
    per_epoch = steps_per_epoch(n_examples, micro_batch, grad_accum, tp)
    if per_epoch == 0:
        key = f"{where}.{MICRO_BATCH_KEY.get(where, 'per_device_train_batch_size')}"
        replicas = f"{dp_world_size(tp)} data-parallel replicas (tensor-parallel degree {tp})" if tp > 1 else \
            f"{dp_world_size(tp)} ranks"
        raise ConfigError(f"{key}={micro_batch}: {n_examples} training examples are fewer than one step "
                          f"({micro_batch} x {grad_accum} x {replicas}); lower it or add data")
    steps = per_epoch * epochs
    return min(steps, max_steps) if max_steps else steps


def engine_and_budget(cfg: RunConfig, model, s: SupervisedSection, where: str,
                      n_train: int) -> tuple[Any, int, int, int]:
    """The DeepSpeed engine training `model` as stage section `s` says (`where`: its config key, e.g.
    "stage.dpo") on n_train examples: (engine, total optimizer steps, steps per epoch, tensor-parallel
    degree; the ranks of a tensor-parallel group share their batches)."""
    tp = tp_degree(s.strategy)
    n_steps = total_steps(n_train, s.per_device_train_batch_size, s.gradient_accumulation_steps, s.num_train_epochs,
                          s.max_steps, where, tp)
    per_epoch = steps_per_epoch(n_train, s.per_device_train_batch_size, s.gradient_accumulation_steps, tp)
    engine = initialize(cfg, model, s, where, micro_batch=s.per_device_train_batch_size,
                        grad_accum=s.gradient_accumulation_steps, total_steps=n_steps)
    return engine, n_steps, per_epoch, tp


def resume_or_evaluate(cfg: RunConfig, ctx: StageContext, stage: str, s: SupervisedSection, logger, engines: dict,
                       evaluate: Callable[[], dict]) -> tuple[Checkpointer, int, dict]:
    """(the stage's checkpointer, the step it resumes from (0 on a fresh start), the held-out evaluation
    before training): the checkpoint's `eval_before` on resume, else `evaluate()`, logged at step 0."""
    checkpointer = Checkpointer(cfg.stage_dir(stage), s.checkpoint.every_steps, s.checkpoint.every_minutes,
                                s.checkpoint.keep, ctx.config)
    state = resume_stage(cfg, checkpointer, stage, logger, engines)
    before = state.get("eval_before")
    if before is None:
        before = evaluate()
        logger.log(0, "eval", **before)
    return checkpointer, state["step"], before


def _rows(data, indices: list[int]) -> list[dict]:
    """data[i] for i in indices; in one read where `data` can (pipeline.data.Examples.rows)."""
    rows = getattr(data, "rows", None)
    return rows(indices) if rows else [data[i] for i in indices]


def epoch_batches(data, micro_batch: int, collate: Callable, seed: int, epoch: int, skip: int = 0,
                  tp: int = 1) -> Iterator[dict]:
    """This rank's micro-batches of one epoch: a seeded shuffle, split across the data-parallel
    replicas (the tp ranks of a tensor-parallel group get the same share), drop_last.

    `skip` micro-batches are passed over without collating (resume mid-epoch).
    """
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    per_rank = len(order) // dp_world_size(tp)
    mine = order[dp_rank(tp) * per_rank: (dp_rank(tp) + 1) * per_rank]
    for start in range(skip * micro_batch, len(mine) - micro_batch + 1, micro_batch):
        yield collate(_rows(data, mine[start: start + micro_batch]))


def accumulation_batches(data, micro_batch: int, accumulation: int, collate: Callable, seed: int, epoch: int,
                         step: int, per_epoch: int, tp: int = 1) -> Iterator[dict]:
    """This epoch's micro-batches from optimizer step `step` on: exactly enough for its `per_epoch`
    optimizer steps of `accumulation` micro-batches (leftovers would spill into the next epoch)."""
    skip = (step - epoch * per_epoch) * accumulation
    return itertools.islice(epoch_batches(data, micro_batch, collate, seed, epoch, skip, tp), per_epoch * accumulation - skip)


def eval_batches(data, batch: int, collate: Callable, tp: int = 1) -> Iterator[dict]:
    """This rank's share of the evaluation set, in order, in batches of at most `batch` rows (the tp
    ranks of a tensor-parallel group get the same share).

    Every rank yields the same number of batches: under ZeRO-3 each forward is a collective, so a
    rank with one batch more would wait forever for the others. The shares differ by at most one
    row; they are cut into equal counts of batches. Only where a share has fewer rows than there are
    batches (batch 1, or fewer rows than replicas) does a rank repeat rows of its own, as torch's
    DistributedSampler pads, and then its metrics count those rows twice."""
    replicas = dp_world_size(tp)
    mine = list(range(dp_rank(tp), len(data), replicas))
    n_batches = math.ceil(math.ceil(len(data) / replicas) / batch)
    if len(mine) < n_batches:
        mine += [mine[i % len(mine)] if mine else i % len(data) for i in range(n_batches - len(mine))]
    for chunk in _split(mine, n_batches):
        yield collate(_rows(data, chunk))


def _split(items: list[int], parts: int) -> list[list[int]]:
    """`items` cut into `parts` consecutive chunks whose sizes differ by at most one."""
    size, extra = divmod(len(items), parts)
    bounds = [i * size + min(i, extra) for i in range(parts + 1)]
    return [items[bounds[i]: bounds[i + 1]] for i in range(parts)]


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))

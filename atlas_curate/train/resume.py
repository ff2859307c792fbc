"""``train-baseline --resume``: what a resumed run may change, and where training continues.

A run's ``config.toml`` must stay true of every epoch already trained. So, when resuming:

* **cannot change** (refused, naming each field with its old and new value): what the trained epochs were
  trained with, i.e. the data preparation (``voxel_size``, ``box_margin``, ``intensity``), the network
  (``widths``, ``encoder_blocks``, ``decoder_blocks``, ``norm_groups``), the loss, the optimiser and the
  sampling (``bce_weight``, ``dice_weight``, ``dice_smooth``, ``weight_decay``, ``lesion_crop_prob``,
  ``flip_axes``, ``amp``), ``seed`` and ``preset``; every field of a stage that has trained epochs except
  ``epochs`` and ``snapshot_epochs``; the stages that have trained (removed or renamed); a completed stage
  cannot shrink, a stage in progress cannot shrink to its trained epochs or fewer; a snapshot cannot be added
  at an epoch trained without one (it was not saved);
* **can change** (and is recorded): ``epochs`` of the stage in progress; ``epochs`` of the *last* completed
  stage when no later stage has trained (a finished run extended: it goes on with that stage); stages not
  started yet (any field; removed; renamed) and stages added at the end; snapshot epochs not trained yet, and
  dropping trained ones (their files stay, the ensemble no longer uses them); and
  what does not change the trained weights: ``num_workers``, ``cpu_threads``, ``dev_every``,
  ``checkpoint_every``, the inference settings (``overlap``, ``blend``, ``threshold``) and the post-processing
  settings (``postprocess_*``).

Learning-rate schedule. A stage's schedule is cosine annealing with warm restarts whose period is the stage's
``restart_period`` (T_0), not its length, so the rate of epoch ``n`` of a stage does not depend on how many
epochs the stage has. Extending a stage continues its schedule from the epoch reached (the optimiser and
scheduler state of the checkpoint are restored): the extended run trains exactly as a run configured with the
longer stage from the start. When the old length was a whole number of periods, the first added epoch starts
a new cycle (a warm restart, at ``lr``); extend by whole periods to end a cycle at ``min_lr``. An added stage
starts from the last weights with a fresh optimiser and schedule, as every stage does.

:func:`plan_resume` compares the saved configuration with the new one at the checkpoint's position and
returns where training continues and the list of changes, or raises :class:`ValueError` naming every field
that cannot change.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .config import StageConfig, TrainConfig

#: Global fields that say how the trained epochs were trained (data preparation, network, loss, sampling).
FIXED_FIELDS: dict[str, str] = {
    "preset": "the preset", "seed": "the seed",
    "voxel_size": "data preparation", "box_margin": "data preparation", "intensity": "data preparation",
    "widths": "network shape", "encoder_blocks": "network shape", "decoder_blocks": "network shape",
    "norm_groups": "network shape",
    "bce_weight": "loss", "dice_weight": "loss", "dice_smooth": "loss", "weight_decay": "optimiser",
    "lesion_crop_prob": "sampling", "flip_axes": "sampling", "amp": "numerics",
}
#: Global fields that do not change what the trained epochs learnt.
FREE_FIELDS = ("num_workers", "cpu_threads", "dev_every", "checkpoint_every", "overlap", "blend", "threshold",
               "postprocess_sizes_mm3", "postprocess_brain_margin_mm", "postprocess_min_inside")
#: Stage fields that may change in a stage that has trained (within the rules of the module docstring).
STAGE_GROWING_FIELDS = ("epochs", "snapshot_epochs")


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if dataclasses.is_dataclass(value):
        return {k: _plain(v) for k, v in dataclasses.asdict(value).items() if v is not None}
    return value


@dataclass
class Change:
    """One difference between the saved and the new configuration (``before`` None: added; ``after`` None:
    removed)."""

    field: str
    before: Any
    after: Any

    def to_dict(self) -> dict:
        return {"field": self.field, "from": _plain(self.before), "to": _plain(self.after)}

    def __str__(self) -> str:
        return f"{self.field} (was {_plain(self.before)}, now {_plain(self.after)})"


@dataclass
class ResumePlan:
    """Where a resumed run continues: stage index ``stage`` (``len(stages)``: nothing left to train) with
    ``epoch`` of its epochs done; ``continue_stage``: the checkpoint's optimiser and scheduler state continue
    that stage (else the stage starts fresh); ``changes``: every difference from the saved configuration."""

    stage: int
    epoch: int
    continue_stage: bool
    changes: list[Change] = field(default_factory=list)


def _stage_changes(old: StageConfig | None, new: StageConfig | None, prefix: str) -> list[Change]:
    if old is None or new is None:
        return [Change(prefix, old, new)]
    return [Change(f"{prefix}.{f.name}", getattr(old, f.name), getattr(new, f.name))
            for f in dataclasses.fields(StageConfig) if getattr(old, f.name) != getattr(new, f.name)]


def _trained_stage_problems(old: StageConfig, new: StageConfig | None, trained: int, later: int,
                            changes: list[Change]) -> tuple[list[str], bool]:
    """Why the changes to a stage with ``trained`` epochs (``later``: epochs trained in the stages after it)
    cannot continue the run, and whether the change extends the (completed) stage."""
    prefix = f"stages.{old.name}"
    if new is None or new.name != old.name:
        what = "removed" if new is None else f"renamed to {new.name!r}"
        return [f"{prefix} ({what}; it has trained {trained} epochs)"], False
    problems = [f"{change} [a stage that has trained]" for change in changes
                if change.field.rsplit(".", 1)[1] not in STAGE_GROWING_FIELDS]
    complete = trained == old.epochs
    extends = False
    epochs = f"{prefix}.epochs (was {old.epochs}, now {new.epochs})"
    if new.epochs < trained or (not complete and new.epochs == trained):
        problems.append(f"{epochs} [cannot shrink {'below' if complete else 'to or below'} the {trained} epochs "
                        "trained]")
    elif complete and new.epochs > trained:
        if later:
            problems.append(f"{epochs} [only the last trained stage can be extended; later stages have trained "
                            f"{later} epochs on top of it]")
        else:
            extends = True
    unsaved = sorted(e for e in new.snapshot_epochs if e <= trained and e not in old.snapshot_epochs)
    if unsaved:
        problems.append(f"{prefix}.snapshot_epochs (was {list(old.snapshot_epochs)}, now "
                        f"{list(new.snapshot_epochs)}) [epochs {unsaved} were trained without a snapshot]")
    return problems, extends


def plan_resume(saved: TrainConfig, config: TrainConfig, position: tuple[int, int]) -> ResumePlan:
    """Compare ``saved`` (the run's ``config.toml``) with ``config`` at the checkpoint's ``position`` (stage index,
    epochs done in it; ``(len(stages), 0)`` for a finished run); see the module docstring. Raises
    :class:`ValueError` listing every change that cannot continue the run, each with its old and new value."""
    stage, epoch = int(position[0]), int(position[1])
    done = [s.epochs if i < stage else epoch if i == stage else 0 for i, s in enumerate(saved.stages)]
    changes: list[Change] = []
    refused: list[str] = []
    for f in dataclasses.fields(TrainConfig):
        before, after = getattr(saved, f.name), getattr(config, f.name)
        if f.name != "stages" and before != after:
            changes.append(Change(f.name, before, after))
            if f.name not in FREE_FIELDS:
                refused.append(f"{changes[-1]} [{FIXED_FIELDS.get(f.name, 'training')}]")

    start = (stage, epoch, epoch > 0)
    for i in range(max(len(saved.stages), len(config.stages))):
        old = saved.stages[i] if i < len(saved.stages) else None
        new = config.stages[i] if i < len(config.stages) else None
        stage_changes = _stage_changes(old, new, f"stages.{(old or new).name}")
        changes += stage_changes
        if old is None or done[i] == 0:
            continue                       # added, or not started yet: anything goes
        problems, extends = _trained_stage_problems(old, new, done[i], sum(done[i + 1:]), stage_changes)
        refused += problems
        if extends:
            start = (i, done[i], True)
    if refused:
        raise ValueError("these cannot be changed when resuming: " + "; ".join(refused))
    return ResumePlan(*start, changes=changes)

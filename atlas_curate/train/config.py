"""The run configuration of ``train-baseline``: every knob in one dataclass, two presets, TOML in and out.

Presets:

* ``paper``: the schedule of Tomita et al. 2020 as described in the paper. 1 mm template grid, stem width 16
  and encoder widths 32/64/128/256 (three downsamplings), four residual blocks at the bottleneck; a zoom-in
  stage on random 128³ crops (Adam, lr 1e-3, 1200 epochs) and a zoom-out stage on 144 × 172 × 168 crops
  (lr 1e-4, 150 epochs) that starts from the zoom-in weights; cosine annealing with warm restarts every
  50 epochs (T_0), so the zoom-out snapshots at epochs 50/100/150 fall at the ends of the cycles (the
  snapshot ensemble of Huang et al. 2017). Crops are rounded up to a multiple of 8 for the network (three
  downsamplings), so the zoom-out crop is 144 × 176 × 168 in practice. Batch sizes, the number of crops
  per epoch and the lesion-crop probability are not given in the paper: the values here are our choices
  (one crop per training scan per epoch; batch 2 at 128³ and 1 at 144 × 176 × 168 fit a 24 GB GPU in bf16).
* ``quick``: the same network class and schedule shape for a CPU in minutes: images reduced to 2 mm voxels
  (block averages, partial-volume targets, see ``data``), half the widths (8; 16/32/64/128), a zoom-in
  stage on 48³ crops (96 mm) with one cosine cycle over 40 epochs of 16 batches of 2, then a zoom-out stage
  on 64³ crops (128 mm; lr 1e-3) for 3 one-epoch cycles of 16 crops whose ends are the 3 snapshots; the dev
  Dice only at the end of each stage. (Tuned on a synthetic release: whole-volume 80 × 96 × 80 zoom-out
  crops at lr 3e-4 lost recall in so few iterations, mean test DSC 0.71 against 0.74.)

``--config FILE`` is a TOML file whose keys override the preset's: scalars replace, ``[stages.<name>]``
tables update one stage's fields, a ``[[stages]]`` array replaces the whole stage list. The full effective
configuration is written to ``RUN_DIR/config.toml`` and read back by ``evaluate`` and ``predict``. With
``--resume`` the keys override the run's own ``config.toml`` instead (so ``--resume`` alone continues the run as
it was configured, and ``[stages.zoom_out]`` / ``epochs = 60`` extends a stage; see :mod:`.resume`).

Post-processing (``postprocess_*``, :mod:`atlas_curate.postprocess`): the minimum lesion sizes (mm³) tried on
the dev scans at the end of training, the margin (mm) by which the template brain is dilated and the fraction
of a component's voxels that must lie inside it.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

PRESETS = ("paper", "quick")
INTENSITY_MODES = ("wm", "zscore")
BLEND_MODES = ("gaussian", "uniform")


@dataclass
class StageConfig:
    """One training stage: random crops of ``crop`` voxels (on the working grid) for ``epochs`` epochs.

    ``restart_period`` is T_0 of cosine annealing with warm restarts, in epochs (the learning rate falls
    from ``lr`` to ``min_lr`` over each period and jumps back). ``iterations_per_epoch`` batches make one
    epoch; ``None`` means one crop per training scan (``ceil(n_train / batch_size)`` batches).
    ``snapshot_epochs`` (1-based, within the stage) are saved as ``checkpoints/<name>-epoch<N>.pt``; the
    snapshots of the last stage form the snapshot ensemble. A stage starts from the previous stage's
    weights with a fresh optimiser and schedule.
    """

    name: str
    crop: tuple[int, int, int]
    epochs: int
    lr: float
    restart_period: int
    batch_size: int = 1
    min_lr: float = 0.0
    iterations_per_epoch: int | None = None
    snapshot_epochs: tuple[int, ...] = ()


@dataclass
class TrainConfig:
    """Every knob of a training run (see the module docstring for the presets)."""

    preset: str = "paper"
    seed: int = 0
    # data
    voxel_size: int = 1                 # working voxel size in mm: integer block-average of the 1 mm template grid
    box_margin: int = 4                 # mm around the template brain's bounding box
    intensity: str = "wm"               # wm: T1 / 100 (white matter ≈ 1); zscore: mean 0, sd 1 inside the brain
    lesion_crop_prob: float = 0.5       # probability that a crop is placed to contain a lesion voxel
    flip_axes: tuple[int, ...] = (0,)   # axes flipped at random (p = 0.5 each); 0 is left-right
    # network
    widths: tuple[int, ...] = (16, 32, 64, 128, 256)   # stem, then one per resolution level
    encoder_blocks: tuple[int, ...] = (1, 1, 1, 4)     # residual blocks per level (the last is the bottleneck)
    decoder_blocks: int = 1
    norm_groups: int = 8
    # loss and optimiser
    bce_weight: float = 0.1
    dice_weight: float = 0.9
    dice_smooth: float = 1.0
    weight_decay: float = 1e-4
    stages: list[StageConfig] = field(default_factory=list)
    # execution
    num_workers: int = 4                # DataLoader workers (0: in the training process)
    cpu_threads: int = 0                # torch threads on CPU (0: torch's default, one per core)
    amp: bool = True                    # bf16 autocast on CUDA (never on CPU)
    dev_every: int = 1                  # dev-set Dice every N epochs and at the end of every stage (0: only there)
    checkpoint_every: int = 1           # checkpoints/last.pt every N epochs (and at the end of every stage)
    # inference
    overlap: float = 0.5                # sliding-window overlap (fraction of the window)
    blend: str = "gaussian"
    threshold: float = 0.5
    # post-processing (chosen on the dev scans at the end of training; atlas_curate.postprocess)
    postprocess_sizes_mm3: tuple[float, ...] = (0, 10, 20, 50, 100, 200, 500)   # minimum lesion sizes tried
    postprocess_brain_margin_mm: float = 3.0    # the template brain mask is dilated by this much
    postprocess_min_inside: float = 0.5         # a component with a smaller fraction inside it is removed

    def validate(self) -> "TrainConfig":
        problems = []
        if self.voxel_size < 1:
            problems.append("voxel_size must be a positive integer (mm)")
        if self.intensity not in INTENSITY_MODES:
            problems.append(f"intensity must be one of {INTENSITY_MODES}")
        if self.blend not in BLEND_MODES:
            problems.append(f"blend must be one of {BLEND_MODES}")
        if len(self.widths) != len(self.encoder_blocks) + 1:
            problems.append("widths needs one entry more than encoder_blocks (the stem)")
        if any(w % self.norm_groups for w in self.widths):
            problems.append(f"every width must be divisible by norm_groups={self.norm_groups}")
        if not 0 <= self.lesion_crop_prob <= 1:
            problems.append("lesion_crop_prob must lie in [0, 1]")
        if not 0 <= self.overlap < 1:
            problems.append("overlap must lie in [0, 1)")
        if any(a not in (0, 1, 2) for a in self.flip_axes):
            problems.append("flip_axes must be among 0, 1, 2")
        if not self.postprocess_sizes_mm3 or any(s < 0 for s in self.postprocess_sizes_mm3):
            problems.append("postprocess_sizes_mm3 must hold at least one size, none negative")
        if self.postprocess_brain_margin_mm < 0 or not 0 < self.postprocess_min_inside <= 1:
            problems.append("postprocess_brain_margin_mm must be >= 0 and postprocess_min_inside in (0, 1]")
        if self.dev_every < 0 or self.checkpoint_every < 1 or self.num_workers < 0 or self.cpu_threads < 0:
            problems.append("dev_every, num_workers and cpu_threads must be >= 0, checkpoint_every >= 1")
        if not self.stages:
            problems.append("at least one stage is needed")
        multiple = self.size_multiple
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            problems.append(f"stage names must be unique: {names}")
        for stage in self.stages:
            if len(stage.crop) != 3 or any(c < multiple for c in stage.crop):
                problems.append(f"stage {stage.name}: crop {stage.crop} must be 3 sizes of at least {multiple}")
            if stage.epochs < 1 or stage.batch_size < 1 or stage.restart_period < 1 or stage.lr <= 0:
                problems.append(f"stage {stage.name}: epochs, batch_size, restart_period and lr must be positive")
            if any(not 1 <= e <= stage.epochs for e in stage.snapshot_epochs):
                problems.append(f"stage {stage.name}: snapshot epochs must lie in 1..{stage.epochs}")
        if problems:
            raise ValueError("invalid training configuration: " + "; ".join(problems))
        return self

    @property
    def size_multiple(self) -> int:
        """Spatial sizes fed to the network must be multiples of this (2 ** number of downsamplings)."""
        return 2 ** (len(self.widths) - 2)

    def network_crop(self, stage: "StageConfig") -> tuple[int, int, int]:
        """The stage's crop rounded up to :attr:`size_multiple` (paper: 144 × 172 × 168 → 144 × 176 × 168)."""
        m = self.size_multiple
        return tuple(-(-int(c) // m) * m for c in stage.crop)  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        """Plain TOML-able dict (tuples as lists, ``None`` fields left out)."""
        return _plain(dataclasses.asdict(self))


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def paper_config() -> TrainConfig:
    return TrainConfig(
        preset="paper",
        stages=[
            StageConfig("zoom_in", (128, 128, 128), epochs=1200, lr=1e-3, restart_period=50, batch_size=2),
            StageConfig("zoom_out", (144, 172, 168), epochs=150, lr=1e-4, restart_period=50, batch_size=1,
                        snapshot_epochs=(50, 100, 150)),
        ],
        dev_every=10,
    )


def quick_config() -> TrainConfig:
    return TrainConfig(
        preset="quick",
        voxel_size=2,
        widths=(8, 16, 32, 64, 128),
        lesion_crop_prob=0.7,
        num_workers=0,
        stages=[
            StageConfig("zoom_in", (48, 48, 48), epochs=40, lr=3e-3, restart_period=40, batch_size=2,
                        iterations_per_epoch=16),
            StageConfig("zoom_out", (64, 64, 64), epochs=3, lr=1e-3, restart_period=1, batch_size=1,
                        iterations_per_epoch=16, snapshot_epochs=(1, 2, 3)),
        ],
        dev_every=0,
    )


def preset_config(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return paper_config() if name == "paper" else quick_config()


_TUPLE_FIELDS = {"flip_axes", "widths", "encoder_blocks", "crop", "snapshot_epochs", "postprocess_sizes_mm3"}


def _stage_from(doc: dict, base: StageConfig | None, where: str) -> StageConfig:
    known = {f.name for f in dataclasses.fields(StageConfig)}
    unknown = set(doc) - known
    if unknown:
        raise ValueError(f"{where}: unknown stage keys {sorted(unknown)}; known: {sorted(known)}")
    values = dataclasses.asdict(base) if base is not None else {}
    values.update(doc)
    missing = {f.name for f in dataclasses.fields(StageConfig)
               if f.default is dataclasses.MISSING and f.name not in values}
    if missing:
        raise ValueError(f"{where}: stage is missing {sorted(missing)}")
    values = {k: tuple(v) if k in _TUPLE_FIELDS and v is not None else v for k, v in values.items()}
    return StageConfig(**values)


def apply_overrides(config: TrainConfig, doc: dict, *, where: str = "config") -> TrainConfig:
    """A copy of ``config`` with the keys of ``doc`` (a parsed TOML document) applied; see the module docstring."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(doc) - known
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(TrainConfig)}
    for key, value in doc.items():
        if key == "stages":
            if isinstance(value, list):
                values["stages"] = [_stage_from(s, None, f"{where}: stages[{i}]") for i, s in enumerate(value)]
            elif isinstance(value, dict):
                by_name = {s.name: s for s in values["stages"]}
                for name, stage_doc in value.items():
                    if name not in by_name:
                        raise ValueError(f"{where}: no stage {name!r} to override (stages: {list(by_name)})")
                    by_name[name] = _stage_from({**stage_doc, "name": name}, by_name[name], f"{where}: stages.{name}")
                values["stages"] = list(by_name.values())
            else:
                raise ValueError(f"{where}: stages must be an array of tables or a table of stage tables")
        else:
            values[key] = tuple(value) if key in _TUPLE_FIELDS else value
    return TrainConfig(**values).validate()


def read_toml(path: os.PathLike | str) -> dict:
    from ..io import InputError

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(path, f"not valid TOML ({exc})") from exc


def make_config(preset: str = "quick", config: os.PathLike | str | dict | None = None, *,
                base: TrainConfig | None = None) -> TrainConfig:
    """The preset with the overrides of ``config`` (a TOML path or an already parsed dict) applied.

    With ``base`` (a resumed run's saved configuration) the overrides apply to ``base`` instead, and ``preset``
    only labels the result (a preset other than the run's is then a change :mod:`.resume` refuses)."""
    if base is not None:
        base = base if base.preset == preset else dataclasses.replace(base, preset=preset)
    else:
        base = preset_config(preset)
    if config is None:
        return base.validate()
    if isinstance(config, dict):
        return apply_overrides(base, config)
    try:
        return apply_overrides(base, read_toml(config), where=str(config))
    except (TypeError, ValueError) as exc:
        from ..io import InputError

        raise InputError(config, str(exc)) from exc


def config_to_toml(config: TrainConfig) -> str:
    import tomli_w

    return tomli_w.dumps(config.to_dict())


def save_config(config: TrainConfig, path: os.PathLike | str) -> Path:
    from ..io import write_text

    return write_text(config_to_toml(config), path)


def load_config(path: os.PathLike | str) -> TrainConfig:
    """Read a full configuration written by :func:`save_config` (a run's ``config.toml``)."""
    doc = read_toml(path)
    try:
        return apply_overrides(TrainConfig(), doc, where=str(path))
    except (TypeError, ValueError) as exc:
        from ..io import InputError

        raise InputError(path, str(exc)) from exc

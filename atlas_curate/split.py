"""``split``: a seeded train/dev/test split (or k folds) of the scans, grouped by subject, stratified.

Method
------
Which scans take part. Every scan of :func:`atlas_curate.dataset.scan_table` that has a template-space T1w and
a lesion mask and is not excluded there (QC failed, unless ``include_failed``; normalisation failed). Scans
without a mask (e.g. the hidden-mask test scans of ATLAS R2.0) are excluded with the reason. With
``keep_release_division`` the release's own division is kept: scans whose ``part`` (sessions/participants
column) is ``testing`` are set aside as ``test-release`` and only ``part == training`` scans are split.

Definitions.

* *Lesion volume*: the non-zero voxels of the template-space mask times the voxel volume (mm³).
* *Volume quartile* (1 = smallest … 4): from the rank ``r`` (ties share the average rank) of a scan's volume
  among the *included* scans, ``quartile = floor(4 (r - 1/2) / n) + 1``; equal volumes share a quartile.
* *Stratum* of a subject: ``(cohort, volume quartile of its first scan)``; the first scan is the first in
  sorted scan order. A missing cohort counts as the cohort ``n/a``.
* *Targets*: the scan counts the fractions ask for, by largest remainder over all included scans
  (ties go to the earlier split): 239 scans at 0.76/0.11/0.13 give 182/26/31, the split of Tomita et al. 2020.

Allocation (:func:`assign_splits`), in subjects so that all sessions of a subject stay together, in two divisions:

1. subjects are divided into *rest* and *test* (the held-out test set);
2. the rest is divided into train/dev (fractions ``f_train : f_dev``) or, with ``folds = K``, into K folds of
   equal size. So the test set of a seed does not depend on ``folds``; with folds every non-test scan has
   ``split = train`` and a ``fold``: cross-validation round k uses ``fold == k`` as its dev set and the other
   folds as its training set.

Each division works the same way. Strata are visited in sorted order; inside a stratum the subjects are
shuffled with ``numpy.random.default_rng(seed)`` (one generator for the whole split) and each goes, in turn, to
the group with the largest unfilled quota (stratum scans × fraction, minus scans already given) — largest
remainder, counted in scans. Rounding in small strata leaves the global counts off target, so subjects are
then moved from groups over target to groups under target, one at a time, each time the subject whose stratum
is most over-represented in the group it leaves and most under-represented in the group it joins (ties: a
random order of strata drawn from the same generator, then the shuffled order). Only moves that bring the totals
closer to the targets are made; when no single move does (subjects with several scans), a pair of subjects is
swapped instead. With enough single-scan subjects (as in ATLAS) the totals meet the targets exactly; otherwise
they end as close as such moves get. The train/dev division aims at the global train/dev targets, so a test set
that missed its target by a multi-scan subject is made up for there.

Last, subjects with the same number of scans are swapped between groups, best swap first, while that lowers the
chi-square distance ``sum (n - e)^2 / e`` between the scans a group holds per cohort, per volume quartile and
per stratum (``n``) and its fraction of all of them (``e``); totals do not change. Measured on 3 synthetic
tables × 10 seeds (239 scans, 11 cohorts), the largest gap between a split's scans of one cohort or quartile and
its share is 1.5 scans (mean 1.0), against 3.4 (mean 1.8) for the rounding alone and about 5 for a plain
shuffle. Same inputs and seed → the same split.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from . import __version__, io, tables
from .dataset import lesion_volume_mm3, scan_table
from .index import refresh_index

SPLITS = ("train", "dev", "test")
EXCLUDED = "excluded"
RELEASE_TEST = "test-release"
DEFAULT_FRACTIONS = (0.76, 0.11, 0.13)
N_QUARTILES = 4
NO_COHORT = "n/a"
COLUMNS = ["scan", "subject", "session", "split", "fold", "cohort", "lesion_volume_mm3", "volume_quartile", "t1",
           "mask", "excluded"]


# --- allocation ----------------------------------------------------------------------------------------------

def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """Three non-negative fractions (train, dev, test) that sum to 1."""
    values = tuple(float(f) for f in fractions)
    if len(values) != 3:
        raise ValueError(f"fractions must be three numbers (train, dev, test), got {list(fractions)}")
    if any(not math.isfinite(f) or f < 0 for f in values) or abs(sum(values) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be non-negative and sum to 1, got {list(values)}")
    return values  # type: ignore[return-value]


def parse_fractions(text: str) -> tuple[float, float, float]:
    """``"0.76,0.11,0.13"`` (the CLI's ``--fractions``) as checked fractions."""
    try:
        values = [float(part) for part in str(text).split(",")]
    except ValueError:
        raise ValueError(f"fractions must be three comma-separated numbers, got {text!r}") from None
    return check_fractions(values)


def largest_remainder(total: int, fractions: Sequence[float]) -> np.ndarray:
    """Integers summing to ``total``, proportional to ``fractions`` (Hamilton; ties go to the earlier entry)."""
    share = total * np.asarray(fractions, dtype=float) / float(np.sum(fractions))
    counts = np.floor(share + 1e-9).astype(int)
    remainder = share - counts
    for index in sorted(range(len(share)), key=lambda i: (-round(remainder[i], 9), i))[: total - counts.sum()]:
        counts[index] += 1
    return counts


def volume_quartiles(volumes: pd.Series) -> pd.Series:
    """Quartile 1..4 of each volume among the given ones (see the module docstring)."""
    if volumes.isna().any():
        raise ValueError("volume quartiles need a volume for every scan")
    n = len(volumes)
    if n == 0:
        return pd.Series([], index=volumes.index, dtype=int)
    ranks = volumes.rank(method="average")
    return np.minimum(np.floor(N_QUARTILES * (ranks - 0.5) / n).astype(int) + 1, N_QUARTILES)


class _Allocation:
    """Subjects (with stratum and scan count) divided into groups with given fractions and scan targets."""

    def __init__(self, strata: np.ndarray, weights: np.ndarray, fractions: np.ndarray, targets: np.ndarray,
                 rng: np.random.Generator):
        self.strata, self.weights = strata, weights
        self.fractions, self.targets = fractions / fractions.sum(), targets
        self.names = sorted(set(strata.tolist()))
        self.priority = dict(zip(self.names, rng.permutation(len(self.names)).tolist()))
        self.group = np.full(len(strata), -1)
        self.order = np.zeros(len(strata), dtype=int)
        self.quota: dict[str, np.ndarray] = {}
        self.count: dict[str, np.ndarray] = {}
        for name in self.names:
            members = np.flatnonzero(strata == name)
            members = members[rng.permutation(len(members))]
            quota = weights[members].sum() * self.fractions
            count = np.zeros(len(fractions))
            for rank, i in enumerate(members):
                k = int(np.argmax(quota - count))
                self.group[i], self.order[i] = k, rank
                count[k] += weights[i]
            self.quota[name], self.count[name] = quota, count

    def _surplus(self, i: int, k: int) -> float:
        name = self.strata[i]
        return float(self.count[name][k] - self.quota[name][k])

    def _key(self, i: int, k: int, j: int) -> tuple:
        """How good it is to take subject i out of group k into group j (higher is better)."""
        return (round(self._surplus(i, k) - self._surplus(i, j), 9), self.priority[self.strata[i]], self.order[i])

    def _move(self, i: int, j: int) -> None:
        k = self.group[i]
        name = self.strata[i]
        self.count[name][k] -= self.weights[i]
        self.count[name][j] += self.weights[i]
        self.group[i] = j

    def _totals(self) -> np.ndarray:
        return np.bincount(self.group, weights=self.weights, minlength=len(self.targets)).astype(int)

    @staticmethod
    def _helps(excess: np.ndarray, k: int, j: int, scans: int) -> bool:
        """Whether moving ``scans`` scans from group k to group j brings the totals closer to the targets."""
        return abs(excess[k] - scans) + abs(excess[j] + scans) < abs(excess[k]) + abs(excess[j])

    def _best_single(self, excess: np.ndarray) -> tuple | None:
        best = None
        for k in np.flatnonzero(excess > 0):
            for j in np.flatnonzero(excess < 0):
                for i in np.flatnonzero(self.group == k):
                    if not self._helps(excess, k, j, self.weights[i]):
                        continue
                    key = self._key(i, k, j)
                    if best is None or key > best[0]:
                        best = (key, ((int(i), int(j)),))
        return best

    def _best_swap(self, excess: np.ndarray) -> tuple | None:
        best = None
        for k in np.flatnonzero(excess > 0):
            for j in np.flatnonzero(excess < 0):
                out_k = {}  # best subject of each scan count leaving k, and entering k from j
                for i in np.flatnonzero(self.group == k):
                    key = self._key(i, k, j)
                    if self.weights[i] not in out_k or key > out_k[self.weights[i]][0]:
                        out_k[self.weights[i]] = (key, i)
                out_j = {}
                for i in np.flatnonzero(self.group == j):
                    key = self._key(i, j, k)
                    if self.weights[i] not in out_j or key > out_j[self.weights[i]][0]:
                        out_j[self.weights[i]] = (key, i)
                for wa, (key_a, a) in out_k.items():
                    for wb, (key_b, b) in out_j.items():
                        if wa > wb and self._helps(excess, k, j, wa - wb):
                            key = (round(key_a[0] + key_b[0], 9), key_a[1:], key_b[1:])
                            if best is None or key > best[0]:
                                best = (key, ((int(a), int(j)), (int(b), int(k))))
        return best

    def balance(self) -> np.ndarray:
        """Move (or swap) subjects while that brings the scan totals closer to the targets."""
        while True:
            excess = self._totals() - self.targets
            if not excess.any():
                break
            best = self._best_single(excess) or self._best_swap(excess)
            if best is None:
                break
            for i, j in best[1]:
                self._move(i, j)
        return self.group

    def refine(self, features: np.ndarray, max_swaps: int = 1000) -> np.ndarray:
        """Swap subjects with equal scan counts between groups while that lowers the chi-square distance
        between each group's scans per category (``features``: scans of each subject per cohort, per volume
        quartile and per stratum) and the group's fraction of them. Totals do not change."""
        n_groups = len(self.fractions)
        expected = np.outer(self.fractions, features.sum(axis=0))
        inverse = np.divide(1.0, expected, out=np.zeros_like(expected), where=expected > 0)
        members = [np.flatnonzero(self.group == g) for g in range(n_groups)]
        members = [m[np.argsort(self.order[m], kind="stable")] for m in members]
        margins = np.stack([features[m].sum(axis=0) for m in members])
        for _ in range(max_swaps):
            best = None
            for k in range(n_groups):
                for j in range(k + 1, n_groups):
                    a, b = members[k], members[j]
                    if not len(a) or not len(b):
                        continue
                    change = features[b][None, :, :] - features[a][:, None, :]  # to group k when a <-> b
                    cost_k = (((margins[k] + change - expected[k]) ** 2) * inverse[k]).sum(axis=-1)
                    cost_j = (((margins[j] - change - expected[j]) ** 2) * inverse[j]).sum(axis=-1)
                    old = (((margins[k] - expected[k]) ** 2) * inverse[k]).sum() + \
                        (((margins[j] - expected[j]) ** 2) * inverse[j]).sum()
                    gain = np.where(self.weights[a][:, None] == self.weights[b][None, :], old - cost_k - cost_j,
                                    -np.inf)
                    x, y = np.unravel_index(int(np.argmax(gain)), gain.shape)
                    if gain[x, y] > 1e-9 and (best is None or gain[x, y] > best[0] + 1e-12):
                        best = (float(gain[x, y]), k, j, x, y)
            if best is None:
                break
            _, k, j, x, y = best
            a, b = members[k][x], members[j][y]
            margins[k] += features[b] - features[a]
            margins[j] += features[a] - features[b]
            members[k][x], members[j][y] = b, a
            self.group[a], self.group[b] = j, k
        return self.group


def _divide(subjects: pd.DataFrame, features: np.ndarray, fractions: Sequence[float], targets: np.ndarray,
            rng: np.random.Generator) -> np.ndarray:
    if subjects.empty:
        return np.zeros(0, dtype=int)
    allocation = _Allocation(subjects["stratum"].to_numpy(dtype=object), subjects["weight"].to_numpy(dtype=int),
                             np.asarray(fractions, dtype=float), np.asarray(targets, dtype=int), rng)
    allocation.balance()
    return allocation.refine(features)


def _features(table: pd.DataFrame, subjects: pd.Index) -> np.ndarray:
    """Scans of each subject per cohort, per volume quartile and per stratum (one column each)."""
    quartile = "Q" + table["volume_quartile"].astype(str)
    columns = [table["cohort"].map("cohort {}".format), quartile, table["cohort"] + "|" + quartile]
    parts = [pd.crosstab(table["subject"], c).reindex(index=subjects, fill_value=0) for c in columns]
    return pd.concat(parts, axis=1).to_numpy(dtype=float)


def _subject_table(table: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
    """Subjects of a scan table sorted by scan (``subject``, ``weight`` = scans, ``stratum`` = cohort and volume
    quartile of the first scan), sorted by subject, and their :func:`_features`."""
    first = table.groupby("subject", sort=False).head(1).set_index("subject").sort_index()
    subjects = pd.DataFrame({
        "subject": first.index,
        "weight": table.groupby("subject").size().reindex(first.index).to_numpy(),
        "stratum": [f"{c}|Q{q}" for c, q in zip(first["cohort"], first["volume_quartile"])],
    })
    return subjects, _features(table, first.index)


def _fold_groups(subjects: pd.DataFrame, features: np.ndarray, folds: int, rng: np.random.Generator) -> np.ndarray:
    """Subjects into ``folds`` groups of equal scan targets (largest remainder), stratified and balanced."""
    return _divide(subjects, features, [1.0 / folds] * folds,
                   largest_remainder(int(subjects["weight"].sum()), [1] * folds), rng)


def assign_folds(scans: pd.DataFrame, folds: int, seed: int = 0) -> pd.Series:
    """Divide scans into ``folds`` groups as ``split --folds`` divides the non-test scans.

    ``scans`` needs the columns ``scan``, ``subject``, ``cohort`` and ``volume_quartile`` (kept as given, e.g.
    the quartiles of a written split). All scans of a subject go to one group; subjects are stratified by
    (cohort, volume quartile of their first scan) and groups get equal scan targets by largest remainder,
    with the same allocation, balancing and refinement as :func:`assign_splits` and a generator
    ``numpy.random.default_rng(seed)`` of its own. Returns the group (0..folds-1) of each scan, indexed like
    ``scans``. Same inputs and seed -> the same groups.
    """
    missing = {"scan", "subject", "cohort", "volume_quartile"} - set(scans.columns)
    if missing:
        raise ValueError(f"assign_folds needs the columns {sorted(missing)}")
    if int(folds) != folds or folds < 1:
        raise ValueError(f"folds must be a positive integer, got {folds}")
    if scans["scan"].duplicated().any():
        raise ValueError(f"duplicate scans: {sorted(set(scans.loc[scans['scan'].duplicated(), 'scan']))}")
    table = scans[["scan", "subject", "cohort", "volume_quartile"]].copy()
    table["cohort"] = table["cohort"].fillna(NO_COHORT).astype(str)
    table = table.sort_values("scan")
    if table.empty:
        return pd.Series([], index=scans.index, dtype=int)
    subjects, features = _subject_table(table)
    if len(subjects) < folds:
        raise ValueError(f"{folds} folds need at least {folds} subjects, there are {len(subjects)}")
    group = _fold_groups(subjects, features, int(folds), np.random.default_rng(seed))
    fold_of = dict(zip(subjects["subject"], group.tolist()))
    return scans["subject"].map(fold_of).astype(int)


def assign_splits(scans: pd.DataFrame, seed: int = 0, fractions: Sequence[float] = DEFAULT_FRACTIONS,
                  folds: int | None = None) -> pd.DataFrame:
    """Split a table of scans (columns ``scan``, ``subject``, ``cohort``, ``lesion_volume_mm3``).

    Returns a copy sorted by scan with ``volume_quartile``, ``split`` (train/dev/test) and ``fold``
    (0..K-1 for non-test scans when ``folds`` is given, else missing) added; see the module docstring.
    """
    missing = {"scan", "subject", "cohort", "lesion_volume_mm3"} - set(scans.columns)
    if missing:
        raise ValueError(f"assign_splits needs the columns {sorted(missing)}")
    if scans["scan"].duplicated().any():
        raise ValueError(f"duplicate scans: {sorted(set(scans.loc[scans['scan'].duplicated(), 'scan']))}")
    train_f, dev_f, test_f = check_fractions(fractions)
    if folds is not None and (int(folds) != folds or folds < 2):
        raise ValueError(f"folds must be an integer >= 2, got {folds}")
    table = scans.copy()
    table["cohort"] = table["cohort"].fillna(NO_COHORT).astype(str)
    table = table.sort_values("scan").reset_index(drop=True)
    table["volume_quartile"] = volume_quartiles(table["lesion_volume_mm3"].astype(float))
    table["split"] = pd.Series([None] * len(table), dtype=object)
    table["fold"] = pd.array([pd.NA] * len(table), dtype="Int64")
    if table.empty:
        return table

    subjects, features = _subject_table(table)
    rng = np.random.default_rng(seed)
    targets = largest_remainder(len(table), (train_f, dev_f, test_f))
    held_out = _divide(subjects, features, (1.0 - test_f, test_f), np.array([targets[0] + targets[1], targets[2]]),
                       rng)
    rest, rest_features = subjects[held_out == 0].reset_index(drop=True), features[held_out == 0]
    split_of = dict.fromkeys(subjects.loc[held_out == 1, "subject"], "test")
    fold_of: dict[str, int] = {}
    if folds is None:
        group = _divide(rest, rest_features, (train_f, dev_f), targets[:2], rng) if train_f + dev_f > 0 \
            else np.zeros(len(rest), dtype=int)
        split_of.update({s: SPLITS[int(g)] for s, g in zip(rest["subject"], group)})
    else:
        if len(rest) < folds:
            raise ValueError(f"{folds} folds need at least {folds} subjects outside the test set, "
                             f"there are {len(rest)}")
        group = _fold_groups(rest, rest_features, folds, rng)
        split_of.update(dict.fromkeys(rest["subject"], "train"))
        fold_of = {s: int(g) for s, g in zip(rest["subject"], group)}
    table["split"] = table["subject"].map(split_of)
    table["fold"] = pd.array([fold_of.get(s, pd.NA) for s in table["subject"]], dtype="Int64")
    return table


# --- from a BIDS dataset -------------------------------------------------------------------------------------

def _release_part(table: pd.DataFrame, root: Path) -> pd.Series:
    if "part" not in table.columns:
        raise ValueError(f"{root}: keep_release_division needs a 'part' column (training/testing) in "
                         "participants.tsv or the sessions tables; this dataset has none")
    part = table["part"].astype("string").str.strip().str.lower()
    bad = sorted(set(table.loc[~part.isin(["training", "testing"]), "scan"]))
    if bad:
        raise ValueError(f"{root}: 'part' must be 'training' or 'testing'; not so for {', '.join(bad[:5])}"
                         + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))
    return part


def make_split(bids_root: os.PathLike | str, *, seed: int = 0, fractions: Sequence[float] = DEFAULT_FRACTIONS,
               folds: int | None = None, include_failed: bool = False,
               keep_release_division: bool = False, progress: bool = True) -> pd.DataFrame:
    """Split the scans of a (converted, usually normalised) BIDS dataset; see the module docstring.

    One row per scan of the dataset, sorted by scan: ``scan``, ``subject`` (participant_id), ``session``
    (session_id), ``split`` (train/dev/test, or ``excluded`` / ``test-release`` for scans set aside), ``fold``,
    ``cohort``, ``lesion_volume_mm3`` (template space; also for set-aside scans with a mask),
    ``volume_quartile`` (among included scans), ``t1``, ``mask`` (absolute paths) and ``excluded`` (the reason a
    scan was set aside, else ``""``). The settings are kept in ``table.attrs`` for :func:`write_split`.
    ``progress`` shows a bar while the lesion volumes are read (a minute for the 1453 masks of ATLAS v3.0).
    """
    from tqdm.auto import tqdm

    fractions = check_fractions(fractions)
    root = Path(bids_root).resolve()
    table = scan_table(root, include_failed=include_failed)
    if table.empty:
        raise ValueError(f"{root}: no scans found (is this a bids-convert output?)")
    reason = table["excluded"].fillna("").astype(str)
    reason = reason.where(reason != "", np.where(table["has_mask"].astype(bool), "", "no lesion mask"))
    release_test = pd.Series(False, index=table.index)
    if keep_release_division:
        release_test = _release_part(table, root) == "testing"
        reason = reason.where(~release_test, "release testing scan (keep_release_division)")
    cohort = table["cohort"] if "cohort" in table.columns else pd.Series(NO_COHORT, index=table.index)
    out = pd.DataFrame({
        "scan": table["scan"], "subject": table["participant_id"], "session": table["session_id"],
        "cohort": cohort.fillna(NO_COHORT).astype(str),
        "lesion_volume_mm3": [lesion_volume_mm3(m) if has else float("nan")
                              for m, has in tqdm(list(zip(table["mask"], table["has_mask"])), desc="lesion volumes",
                                                 unit="scan", leave=False, disable=not progress)],
        "t1": table["t1"], "mask": table["mask"], "excluded": reason,
    })
    included = out["excluded"] == ""
    if not included.any():
        raise ValueError(f"{root}: no scan can be split (every scan was set aside: "
                         f"{'; '.join(sorted(set(out['excluded'])))})")
    assigned = assign_splits(out[included], seed=seed, fractions=fractions, folds=folds).set_index("scan")
    out["split"] = np.where(release_test & ~included, RELEASE_TEST, EXCLUDED)
    out.loc[included, "split"] = assigned.loc[out.loc[included, "scan"], "split"].to_numpy()
    out["fold"] = pd.array([pd.NA] * len(out), dtype="Int64")
    out.loc[included, "fold"] = assigned.loc[out.loc[included, "scan"], "fold"].to_numpy()
    out["volume_quartile"] = pd.array([pd.NA] * len(out), dtype="Int64")
    out.loc[included, "volume_quartile"] = assigned.loc[out.loc[included, "scan"], "volume_quartile"].to_numpy()
    out = out[COLUMNS].sort_values("scan").reset_index(drop=True)
    out.attrs = {"seed": int(seed), "fractions": list(fractions), "folds": folds, "include_failed": include_failed,
                 "keep_release_division": keep_release_division, "bids_root": str(root)}
    return out


# --- reports and files ---------------------------------------------------------------------------------------

def _groups(table: pd.DataFrame) -> pd.Series:
    """The group each included scan is counted in: its split, or ``fold-k`` for non-test scans with folds."""
    fold = table["fold"].astype("Int64") if "fold" in table.columns else pd.Series(pd.NA, index=table.index)
    return pd.Series(np.where(fold.notna(), "fold-" + fold.astype("string").fillna(""), table["split"]),
                     index=table.index)


def balance_table(table: pd.DataFrame) -> pd.DataFrame:
    """Per split (or fold) and in all: scans, subjects, scans per cohort, per volume quartile, mean/median volume."""
    used = table[table["split"].isin(SPLITS)].copy()
    used["group"] = _groups(used)
    order = sorted(set(used["group"]), key=lambda g: (g == "test", g != "train", g != "dev", g))
    cohorts = sorted(set(used["cohort"].astype(str)))
    rows = []
    for name, part in [*((g, used[used["group"] == g]) for g in order), ("all", used)]:
        row = {"split": name, "scans": len(part), "subjects": part["subject"].nunique()}
        row.update({f"cohort {c}": int((part["cohort"].astype(str) == c).sum()) for c in cohorts})
        row.update({f"Q{q}": int((part["volume_quartile"] == q).sum()) for q in range(1, N_QUARTILES + 1)})
        row["mean_volume_mm3"] = round(float(part["lesion_volume_mm3"].mean()), 1) if len(part) else float("nan")
        row["median_volume_mm3"] = round(float(part["lesion_volume_mm3"].median()), 1) if len(part) else float("nan")
        rows.append(row)
    return pd.DataFrame(rows).set_index("split")


def split_paths(path: os.PathLike | str) -> tuple[Path, Path]:
    """``(TSV, JSON)`` for ``x.tsv``, ``x.json`` or a bare ``x``."""
    path = Path(path)
    if path.suffix in (".tsv", ".json"):
        return path.with_suffix(".tsv"), path.with_suffix(".json")
    return path.with_name(path.name + ".tsv"), path.with_name(path.name + ".json")


def _relative(value: object, root: Path | None) -> object:
    if not isinstance(value, str) or not value or root is None:
        return value
    path = Path(value)
    return path.relative_to(root).as_posix() if path.is_absolute() and root in path.parents else value


def write_split(table: pd.DataFrame, path: os.PathLike | str) -> tuple[Path, Path]:
    """Write the split as a TSV (one row per scan) and a JSON (settings, counts, scan lists, exclusions).

    Image paths are written relative to the BIDS root (``table.attrs['bids_root']``) so the files stay valid when
    the dataset moves; :func:`load_split` resolves them again. Both files are written atomically.
    """
    tsv, js = split_paths(path)
    attrs = dict(table.attrs)
    root = Path(attrs["bids_root"]) if attrs.get("bids_root") else None
    rows = table.reindex(columns=COLUMNS).copy()
    for column in ("t1", "mask"):
        rows[column] = [_relative(v, root) for v in rows[column]]
    rows["lesion_volume_mm3"] = rows["lesion_volume_mm3"].astype(float).round(3)
    rows["excluded"] = rows["excluded"].fillna("").astype(str).replace("", np.nan)
    tables.write_tsv(rows, tsv)

    used = table[table["split"].isin(SPLITS)]
    folds = attrs.get("folds")
    doc = {
        "generated_by": {"name": "atlas-curate split", "version": __version__},
        "seed": attrs.get("seed"), "fractions": attrs.get("fractions"), "folds": folds,
        "include_failed": attrs.get("include_failed"), "keep_release_division": attrs.get("keep_release_division"),
        "grouping": "subject (all sessions of a subject in one split)",
        "strata": "cohort x lesion-volume quartile of the subject's first scan",
        "counts": {
            "scans": {s: int((table["split"] == s).sum()) for s in (*SPLITS, RELEASE_TEST, EXCLUDED)},
            "subjects": {s: int(used.loc[used["split"] == s, "subject"].nunique()) for s in SPLITS},
        },
        "splits": {s: sorted(used.loc[used["split"] == s, "scan"]) for s in SPLITS},
        "fold_scans": None if not folds else
        [sorted(used.loc[used["fold"] == k, "scan"]) for k in range(int(folds))],
        "test_release": sorted(table.loc[table["split"] == RELEASE_TEST, "scan"]),
        "excluded": {r.scan: r.excluded for r in table[~table["split"].isin(SPLITS)].itertuples()},
        "tsv": tsv.name,
    }
    tables.write_json(doc, js)
    refresh_index(root, "split", tsv)   # the split made from this dataset joins its index page
    return tsv, js


def load_split(path: os.PathLike | str, bids_root: os.PathLike | str | None = None) -> pd.DataFrame:
    """Read a split written by :func:`write_split` (``.tsv``, ``.json`` or the common stem).

    With ``bids_root`` the image paths are made absolute. The settings from the JSON (when present) go to
    ``table.attrs``; a JSON that disagrees with the TSV is an error.
    """
    tsv, js = split_paths(path)
    if not tsv.is_file():
        raise io.InputError(tsv, "split table not found")
    try:
        table = tables.read_tsv(tsv)
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise io.InputError(tsv, f"not a readable TSV ({exc})") from exc
    missing = [c for c in ("scan", "subject", "split", "t1", "mask") if c not in table.columns]
    if missing:
        raise io.InputError(tsv, f"not a split table: missing columns {missing}")
    unknown = sorted(set(table["split"].fillna("")) - {*SPLITS, EXCLUDED, RELEASE_TEST})
    if unknown:
        raise io.InputError(tsv, f"unknown split values {unknown}")
    table = table.reindex(columns=COLUMNS)
    table["excluded"] = table["excluded"].astype(object).fillna("")
    for column in ("fold", "volume_quartile"):
        try:
            table[column] = pd.to_numeric(table[column]).astype("Int64")
        except (ValueError, TypeError) as exc:
            raise io.InputError(tsv, f"column {column!r} must hold integers or n/a ({exc})") from exc
    table["lesion_volume_mm3"] = pd.to_numeric(table["lesion_volume_mm3"], errors="coerce")
    attrs: dict = {}
    if js.is_file():
        try:
            doc = tables.read_json(js)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise io.InputError(js, f"not valid JSON ({exc})") from exc
        for split in SPLITS:
            if sorted(table.loc[table["split"] == split, "scan"]) != sorted(doc.get("splits", {}).get(split, [])):
                raise io.InputError(js, f"its {split!r} scans differ from those of {tsv.name}")
        attrs = {k: doc.get(k) for k in ("seed", "fractions", "folds", "include_failed", "keep_release_division")}
    if bids_root is not None:
        root = Path(bids_root).resolve()
        attrs["bids_root"] = str(root)
        for column in ("t1", "mask"):
            table[column] = [str(root / v) if isinstance(v, str) and v and not Path(v).is_absolute() else v
                             for v in table[column]]
    table.attrs = attrs
    return table

"""Dataset tables from the template-space masks, beside the release spreadsheet's own counts.

Definitions (the anatomy is :func:`atlas_curate.anatomy.classify_lesion`, the project's one rule set; its
module docstring gives the thresholds):

* a *lesion* is one label of the scan's ``desc-lesions_dseg`` that has voxels on the template grid
  (1 = primary; a label found only in the native dseg is listed in the lesion report, not counted);
* *hemisphere* of a lesion for the per-hemisphere counts: the sign of its centroid's x in MNI mm
  (x < 0 is left), so a bilateral lesion counts on the side of its centroid, as in the spreadsheet;
  the primary lesion's *hemisphere* (Table 1) is ``classify_lesion``'s: Left, Right, or other
  (Bilateral: at least 20 % of the lesion on each side; Brainstem);
* *cortical*: the lesion reaches the template's grey matter (cortex mask outside the deep grey box);
  *subcortical* otherwise; *other* (brainstem / cerebellum): at least half of the lesion lies in the
  infratentorial region, a plane through template space (z < -12 - 0.25 (y + 40), y < -10), brainstem
  when most of it is within 15 mm of the midline.

Table 1 counts scans (one vs several lesions, primary lesion left / right / other), Table 2 counts
lesions (cortical / subcortical per hemisphere, other), each for all included scans and per cohort,
computed beside the spreadsheet (``n_lesions_lh_cortical`` ... ``n_lesions_other``,
``primary_lesion_hemisphere``, ``primary_lesion_location``). Percentages are of the group's scans
(Table 1; for the spreadsheet, of the scans that have the value) or of its lesions (Table 2).
``disagreements`` lists every scan and measure where both sides are known and differ.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .. import anatomy
from ..naming import SPACE
from .maps import LesionStats, ScanStats

COUNT_COLUMNS = {
    "lh_cortical": "n_lesions_lh_cortical",
    "lh_subcortical": "n_lesions_lh_subcortical",
    "rh_cortical": "n_lesions_rh_cortical",
    "rh_subcortical": "n_lesions_rh_subcortical",
    "other": "n_lesions_other",
}
HEMISPHERE_COLUMN = "primary_lesion_hemisphere"
LOCATION_COLUMN = "primary_lesion_location"
HEMISPHERES = ("left", "right", "bilateral", "brainstem")
LOCATIONS = ("cortical", "subcortical", "brainstem", "cerebellum", "other")
TABLE_COLUMNS = ["group", "measure", "computed", "computed_percent", "spreadsheet", "spreadsheet_percent",
                 "difference"]
DISAGREEMENT_COLUMNS = ["scan", "cohort", "measure", "computed", "spreadsheet"]
DEFINITIONS = {
    "lesion": "one label of the scan's desc-lesions_dseg with voxels on the template grid (1 = primary lesion)",
    "side": f"sign of the lesion centroid's x in {SPACE} mm (x < 0: left); a bilateral lesion counts on "
            "the side of its centroid (per-hemisphere counts, Table 2)",
    "hemisphere": "atlas_curate.anatomy.classify_lesion: Left/Right from the centroid, Bilateral when at least "
                  f"{anatomy.BILATERAL_FRACTION:.0%} of the lesion lies on each side of the midline, Brainstem "
                  "(primary lesion, Table 1: Bilateral and Brainstem count as other)",
    "cortical": f"the lesion reaches cortex: at least {anatomy.CORTICAL_MIN_VOXELS} voxels (or "
                f"{anatomy.CORTICAL_MIN_FRACTION:.0%} of it) in the template grey matter (probability >= 0.5) "
                "outside the deep grey box (x, y, z ranges in mm: "
                f"{', '.join(f'{lo:g}..{hi:g}' for lo, hi in anatomy.DEEP_GREY_BOX)})",
    "subcortical": "neither cortical nor other",
    "other": "at least half of the lesion lies in the infratentorial region, a plane through template space: "
             "y < -10 and z < -12 - 0.25 (y + 40) mm; brainstem when most of it is within 15 mm of the midline, "
             "cerebellum otherwise",
}
LESION_COLUMNS = {
    "scan": "Scan (sub-X_ses-Y)",
    "participant_id": "BIDS participant label",
    "session_id": "BIDS session label",
    "cohort": "Cohort (site) from participants.tsv",
    "lesion": "Lesion index = label in the lesion dseg (1 = primary lesion, 2.. = secondary lesions)",
    "role": "primary or secondary",
    "volume_mm3_native": "Lesion volume in the native (scanner) space of the T1w: voxel count of the label in the "
                         "converted native dseg times the voxel volume of its header (n/a: no native dseg, e.g. "
                         "a standard-space release)",
    "volume_mm3_template": "Lesion volume on the template grid: voxel count times the template voxel volume",
    "voxels_template": "Number of template voxels of the lesion",
    "centroid_x_mm": f"Lesion centroid, {SPACE} x (mm; + = right)",
    "centroid_y_mm": "Lesion centroid, MNI y (mm; + = anterior)",
    "centroid_z_mm": "Lesion centroid, MNI z (mm; + = superior)",
    "hemisphere": "Left | Right | Bilateral (>= 20 % of the lesion on each side) | Brainstem "
                  "(atlas_curate.anatomy.classify_lesion)",
    "side": "Left | Right: sign of the centroid's x (used for the per-hemisphere counts of Table 2)",
    "location": "cortical (reaches the template grey matter) | subcortical | other (brainstem, cerebellum)",
    "other_site": "brainstem | cerebellum for location 'other'",
}


def _text(value) -> str | None:
    if value is None or (isinstance(value, float) and np.isnan(value)) or pd.isna(value):
        return None
    text = str(value).strip()
    return text or None


def computed_counts(stats: ScanStats) -> dict:
    """Per-scan counts from the template-space lesions (see the module docstring)."""
    lesions = [les for les in stats.lesions if les.voxels > 0]
    counts = {key: 0 for key in COUNT_COLUMNS}
    for les in lesions:
        if les.location == "other":
            counts["other"] += 1
        else:
            counts[f"{'lh' if les.side == 'Left' else 'rh'}_{les.location}"] += 1
    primary = next((les for les in lesions if les.label == 1), None)
    return {
        "n_lesions": len(lesions),
        **counts,
        "primary_hemisphere": primary.hemisphere if primary else None,
        "primary_location": (primary.other_site or primary.location) if primary else None,
        "primary_category": primary.location if primary else None,
    }


def spreadsheet_counts(row: pd.Series) -> dict:
    """The same counts as the release spreadsheet gives them (None where it has no value)."""
    values = {}
    for key, column in COUNT_COLUMNS.items():
        value = row.get(column)
        values[key] = None if value is None or pd.isna(value) else int(float(value))
    known = all(v is not None for v in values.values())
    hemisphere = _text(row.get(HEMISPHERE_COLUMN))
    location = _text(row.get(LOCATION_COLUMN))
    return {
        "n_lesions": sum(values.values()) if known else None,
        **values,
        "primary_hemisphere": hemisphere,
        "primary_location": location,
    }


def compare_frame(included: pd.DataFrame, stats: dict[str, ScanStats]) -> pd.DataFrame:
    """One row per included scan: ``computed_*`` and ``spreadsheet_*`` values side by side."""
    rows = []
    for _, row in included.iterrows():
        ours = computed_counts(stats[row["scan"]])
        theirs = spreadsheet_counts(row)
        rows.append({"scan": row["scan"], "cohort": _text(row.get("cohort")),
                     **{f"computed_{k}": v for k, v in ours.items()},
                     **{f"spreadsheet_{k}": v for k, v in theirs.items()}})
    return pd.DataFrame(rows)


def _groups(frame: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    groups = [("all", frame)]
    if len(frame) and frame["cohort"].notna().any():
        for cohort in sorted(frame["cohort"].dropna().unique()):
            groups.append((str(cohort), frame[frame["cohort"] == cohort]))
    return groups


def _percent(part: int | None, whole: int | None) -> float | None:
    if part is None or not whole:
        return None
    return round(100.0 * part / whole, 1)


def _row(group: str, measure: str, computed: int, computed_base: int, sheet: int | None,
         sheet_base: int | None) -> dict:
    return {"group": group, "measure": measure, "computed": computed,
            "computed_percent": _percent(computed, computed_base), "spreadsheet": sheet,
            "spreadsheet_percent": _percent(sheet, sheet_base),
            "difference": None if sheet is None else computed - sheet}


def _hemisphere_class(value) -> str | None:
    value = _text(value)
    if value is None:
        return None
    value = value.lower()
    return value if value in ("left", "right") else "other"


def table1(frame: pd.DataFrame) -> pd.DataFrame:
    """Scans: how many, with no / one / several lesions, and the primary lesion's hemisphere."""
    rows = []
    for group, part in _groups(frame):
        n = len(part)
        counts = part["spreadsheet_n_lesions"].dropna().astype(int) if n else pd.Series(dtype=int)
        sheet_n = len(counts)
        ours = part["computed_n_lesions"].astype(int) if n else pd.Series(dtype=int)
        rows.append(_row(group, "scans", n, n, sheet_n or None, sheet_n))  # spreadsheet: scans with its counts
        for measure, test in (("no_lesion", lambda s: s == 0), ("single_lesion", lambda s: s == 1),
                              ("multiple_lesions", lambda s: s > 1)):
            rows.append(_row(group, measure, int(test(ours).sum()), n,
                             int(test(counts).sum()) if sheet_n else None, sheet_n))
        computed_side = part["computed_primary_hemisphere"].map(_hemisphere_class) if n else pd.Series(dtype=object)
        sheet_side = part["spreadsheet_primary_hemisphere"].map(_hemisphere_class).dropna() if n else \
            pd.Series(dtype=object)
        for side in ("left", "right", "other"):
            rows.append(_row(group, f"primary_{side}", int((computed_side == side).sum()), n,
                             int((sheet_side == side).sum()) if len(sheet_side) else None, len(sheet_side)))
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


TABLE2_MEASURES = ("lh_cortical", "lh_subcortical", "rh_cortical", "rh_subcortical", "other")


def table2(frame: pd.DataFrame) -> pd.DataFrame:
    """Lesions: cortical / subcortical per hemisphere and other, with totals."""
    rows = []
    for group, part in _groups(frame):
        ours = {m: int(part[f"computed_{m}"].sum()) for m in TABLE2_MEASURES}
        known = part.dropna(subset=["spreadsheet_n_lesions"]) if len(part) else part
        theirs = {m: int(known[f"spreadsheet_{m}"].sum()) for m in TABLE2_MEASURES} if len(known) else None
        ours["cortical"] = ours["lh_cortical"] + ours["rh_cortical"]
        ours["subcortical"] = ours["lh_subcortical"] + ours["rh_subcortical"]
        ours["total"] = sum(ours[m] for m in TABLE2_MEASURES)
        if theirs is not None:
            theirs["cortical"] = theirs["lh_cortical"] + theirs["rh_cortical"]
            theirs["subcortical"] = theirs["lh_subcortical"] + theirs["rh_subcortical"]
            theirs["total"] = sum(theirs[m] for m in TABLE2_MEASURES)
        for measure in (*TABLE2_MEASURES, "cortical", "subcortical", "total"):
            rows.append(_row(group, measure, ours[measure], ours["total"],
                             theirs[measure] if theirs else None, theirs["total"] if theirs else None))
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def _location_agrees(sheet: str, category: str | None, site: str | None) -> bool | None:
    """Whether the spreadsheet's primary location matches ours; None when its word is not comparable."""
    word = sheet.strip().lower()
    if word not in LOCATIONS or category is None:
        return None
    if word in ("cortical", "subcortical", "other"):
        return category == word
    return category == "other" and site == word


def disagreements(frame: pd.DataFrame) -> pd.DataFrame:
    """Every (scan, measure) where the computed value and the spreadsheet's are both known and differ.

    Spreadsheet words outside the known vocabulary (hemisphere: Left/Right/Bilateral/Brainstem;
    location: Cortical/Subcortical/Brainstem/Cerebellum/Other) are not compared."""
    rows = []
    for _, row in frame.iterrows():
        for measure in ("n_lesions", *TABLE2_MEASURES):
            ours, theirs = row[f"computed_{measure}"], row[f"spreadsheet_{measure}"]
            if theirs is not None and not pd.isna(theirs) and int(ours) != int(theirs):
                rows.append({"scan": row["scan"], "cohort": row["cohort"], "measure": measure,
                             "computed": int(ours), "spreadsheet": int(theirs)})
        ours, theirs = _text(row["computed_primary_hemisphere"]), _text(row["spreadsheet_primary_hemisphere"])
        if ours and theirs and theirs.lower() in HEMISPHERES and theirs.lower() != ours.lower():
            rows.append({"scan": row["scan"], "cohort": row["cohort"], "measure": "primary_hemisphere",
                         "computed": ours, "spreadsheet": theirs})
        theirs = _text(row["spreadsheet_primary_location"])
        if theirs and _location_agrees(theirs, _text(row["computed_primary_category"]),
                                       _text(row["computed_primary_location"])) is False:
            rows.append({"scan": row["scan"], "cohort": row["cohort"], "measure": "primary_location",
                         "computed": row["computed_primary_location"], "spreadsheet": theirs})
    return pd.DataFrame(rows, columns=DISAGREEMENT_COLUMNS)


def _lesion_record(les: LesionStats) -> dict:
    centroid = les.centroid_mm or (None, None, None)
    return {
        "lesion": les.label,
        "role": "primary" if les.label == 1 else "secondary",
        "volume_mm3_native": les.native_mm3,
        "volume_mm3_template": les.volume_mm3,
        "voxels_template": les.voxels,
        "centroid_x_mm": centroid[0],
        "centroid_y_mm": centroid[1],
        "centroid_z_mm": centroid[2],
        "hemisphere": les.hemisphere or None,
        "side": les.side or None,
        "location": les.location or None,
        "other_site": les.other_site or None,
    }


def lesion_report(included: pd.DataFrame, stats: dict[str, ScanStats]) -> pd.DataFrame:
    """One row per lesion of every included scan (columns: :data:`LESION_COLUMNS`)."""
    rows = []
    for _, row in included.iterrows():
        ids = {"scan": row["scan"], "participant_id": row["participant_id"], "session_id": row["session_id"],
               "cohort": _text(row.get("cohort"))}
        rows += [{**ids, **_lesion_record(les)} for les in stats[row["scan"]].lesions]
    return pd.DataFrame(rows, columns=list(LESION_COLUMNS))


def lesion_document(included: pd.DataFrame, stats: dict[str, ScanStats]) -> dict:
    """The lesion report as JSON: per scan its lesions and notes, plus column descriptions."""
    scans = {}
    for _, row in included.iterrows():
        scan_stats = stats[row["scan"]]
        scans[row["scan"]] = {
            "participant_id": row["participant_id"],
            "session_id": row["session_id"],
            "cohort": _text(row.get("cohort")),
            "notes": scan_stats.notes,
            "lesions": [_lesion_record(les) for les in scan_stats.lesions],
        }
    return {"Description": "Per-lesion report: one entry per lesion (dseg label) of every scan in the overlap map",
            "Columns": LESION_COLUMNS, "Definitions": DEFINITIONS, "Scans": scans}

"""Command-line interface: parses arguments and calls one library function per subcommand."""

from __future__ import annotations

import logging
import sys

import click

from . import __version__, naming


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def _jobs_option(stage: str, what: str = "Worker processes"):
    """--jobs, by default every CPU this process may use, capped so each worker of ``stage`` has its memory."""
    from . import executor

    def resolve(ctx, param, value):
        return executor.default_jobs(stage) if value is None else value

    return click.option("--jobs", "-j", default=None, type=click.IntRange(1), callback=resolve,
                        help=f"{what} [default: the CPUs this process may use (affinity and cgroup quota), at most "
                             f"one per {executor.WORKER_MEMORY_GIB[stage]:g} GiB of available memory].")


def _executor_options(stage: str):
    """--jobs / --executor / --scheduler, shared by every per-scan stage."""
    def decorate(func):
        func = click.option("--scheduler", default=None, metavar="ADDRESS",
                            help="Dask scheduler address (tcp://host:8786) for --executor dask.")(func)
        func = click.option("--executor", default="local", show_default=True, type=click.Choice(["local", "dask"]),
                            help="local: a process pool of --jobs workers; dask: an existing Dask cluster.")(func)
        return _jobs_option(stage, "Worker processes for the local executor")(func)
    return decorate


class _Labels(click.Option):
    """An option taking one or more values after one flag, as BIDS Apps do (``--participant-label 01 02``):
    it takes the words that follow until the next option; it may also be repeated."""

    def add_to_parser(self, parser, ctx):
        super().add_to_parser(parser, ctx)
        for name in self.opts:
            option = parser._long_opt.get(name) or parser._short_opt.get(name)
            if option is None:
                continue
            plain = option.process

            def process(value, state, plain=plain):
                words = [value]
                while state.rargs and not state.rargs[0].startswith("-"):
                    words.append(state.rargs.pop(0))
                for word in words:
                    plain(word, state)

            option.process = process


@click.group(context_settings={"help_option_names": ["-h", "--help"]},
             help=f"Curate the ATLAS stroke-lesion MRI release: convert to BIDS, normalise to {naming.SPACE}, "
                  "summarise lesions, and train and evaluate a segmentation baseline.")
@click.version_option(__version__, prog_name="atlas-curate")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    _setup_logging(verbose)


@main.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--subjects", default=8, show_default=True, type=click.IntRange(1, 2000), help="Number of subjects.")
@click.option("--seed", default=0, show_default=True, type=int, help="Random seed; same seed, same release.")
@click.option("--flavour", default="native", show_default=True,
              type=click.Choice(["native", "standard", "atlas2", "bids"]),
              help="native: ICPSR R1.1 layout with scanner-space heads; standard: FCP-INDI R1.1 layout in template "
                   "space; atlas2: R2.0 layout (ATLAS_2/Training|Testing/RNNN/sub-*/ses-1/anat, one merged mask per "
                   "training scan, testing masks only in the truth); bids: a BIDS lesion dataset of native scans "
                   "(see --layout).")
@click.option("--layout", default="atlas3", show_default=True, type=click.Choice(["atlas3", "lab"]),
              help="bids only. atlas3: our guess at ATLAS v3.0 (ATLAS_3/Training/RNNN/ cohort datasets, "
                   "space-orig T1w + label-L_desc-T1lesion_mask); lab: one lab dataset, session-less and "
                   "two-session subjects, ISLES'26-style sidecar fields.")
@click.option("--brain-extracted/--whole-head", "brain_extracted", default=None,
              help="bids only: brain-extracted T1s or whole heads [default: brain-extracted for atlas3, whole head "
                   "for lab].")
@click.option("--masks", default="anat", show_default=True, type=click.Choice(["anat", "derivatives"]),
              help="bids lab layout only: masks beside the T1 (_label-lesion_roi, in .bidsignore) or in "
                   "derivatives/lesions_manual/ (_space-orig|T1w_desc-lesion_mask).")
@click.option("--faults", is_flag=True, help="Add broken scans (truncated gzip, mask on another grid, empty mask, "
                                            "metadata row without folder, folder without row); not with bids.")
@click.option("--truth", type=click.Path(file_okay=False), default=None,
              help="Where to write the ground truth (default: OUT-truth beside OUT).")
@click.option("--pathology/--no-pathology", default=False, show_default=True,
              help="Render what chronic-stroke brains show besides the lesion (atrophy, white-matter "
                   "hyperintensities following the Fazekas grades, perivascular spaces, ex-vacuo ventricles, "
                   "CSF-dark cavities with grey-matter-like rims); --no-pathology: the clean anatomy.")
@_jobs_option("synth")
def synth(out, subjects, seed, flavour, layout, brain_extracted, masks, faults, truth, pathology, jobs):
    """Write a synthetic ATLAS release (or BIDS lesion dataset) to OUT, with its ground truth beside it."""
    from .synth import default_truth_dir, synthesize

    if flavour != "bids":
        given = click.get_current_context().get_parameter_source
        for name, flag in (("layout", "--layout"), ("brain_extracted", "--brain-extracted/--whole-head"),
                           ("masks", "--masks")):
            if given(name) == click.core.ParameterSource.COMMANDLINE:
                raise click.UsageError(f"{flag} works only with --flavour bids")
    doc = synthesize(out, subjects=subjects, seed=seed, flavour=flavour, faults=faults, truth=truth, jobs=jobs,
                     layout=layout, brain_extracted=brain_extracted, masks=masks, pathology=pathology)
    click.echo(f"wrote {len(doc['scans'])} scans to {out}")
    click.echo(f"ground truth: {truth or default_truth_dir(out)}")


@main.command("bids-convert")
@click.argument("source", type=click.Path(exists=True, file_okay=False))
@click.argument("output", type=click.Path(file_okay=False))
@click.option("--metadata", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Metadata table (xlsx or csv); default: the one at the release root.")
@click.option("--flavour", default="auto", show_default=True,
              type=click.Choice(["auto", "native", "standard", "atlas2", "bids"]),
              help="Release layout; auto detects it (bids: a BIDS dataset, or one per cohort folder).")
@click.option("--naming", "naming_scheme", default="native", show_default=True,
              type=click.Choice(["native", "atlas2"]),
              help="native keeps the release IDs (sub-c0001s0001, ses-t01); atlas2 gives sub-r001s001, ses-1.")
@click.option("--t1w-entities", default=None, metavar="ENTITY=LABEL[,...]",
              help="BIDS sources with several T1w per scan: use the one carrying these entities "
                   "(e.g. acq=mprage,run=1); default: native space, then fewest entities, then lowest run.")
@_executor_options("bids-convert")
@click.option("--overwrite", is_flag=True, help="Redo scans that are already converted.")
def bids_convert(source, output, metadata, flavour, naming_scheme, t1w_entities, jobs, executor, scheduler,
                 overwrite):
    """Convert the ATLAS release or BIDS lesion dataset(s) at SOURCE into a BIDS dataset at OUTPUT."""
    from .convert import convert
    from .convert.bids import parse_filter

    try:
        entities = parse_filter(t1w_entities)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--t1w-entities") from None
    result = convert(source, output, metadata=metadata, flavour=flavour, naming_scheme=naming_scheme,
                     t1w_entities=entities, jobs=jobs, executor=executor, scheduler=scheduler, overwrite=overwrite)
    click.echo(result.summary())
    if result.n_failed:
        sys.exit(1)


@main.command("normalize", help=f"Normalise the T1w images of BIDS_ROOT (from bids-convert) to {naming.SPACE}.")
@click.argument("bids_root", type=click.Path(exists=True, file_okay=False))
@click.option("--participant-label", "participant_labels", cls=_Labels, multiple=True, metavar="LABEL [LABEL ...]",
              help="Only these subjects, with or without 'sub-' (--participant-label 01 02; put BIDS_ROOT first).")
@_executor_options("normalize")
@click.option("--no-deface", is_flag=True, help="Keep the face in the template-space T1w.")
@click.option("--overwrite", is_flag=True, help="Redo scans that are already normalised.")
def normalize_cmd(bids_root, participant_labels, jobs, executor, scheduler, no_deface, overwrite):
    from . import tables
    from .normalize import normalize

    result = normalize(bids_root, participant_labels=list(participant_labels) or None, jobs=jobs,
                       executor=executor, scheduler=scheduler, deface=not no_deface, overwrite=overwrite)
    qc_table = result.qc
    verdicts = qc_table["qc_pass"].map(tables.as_bool)
    click.echo(f"{len(qc_table)} scans: {int(verdicts.eq(True).sum())} passed QC, "
               f"{int((verdicts.eq(False) & (qc_table['status'] != 'failed')).sum())} failed QC, "
               f"{result.n_failed} errors")
    for (_, row), verdict in zip(qc_table.iterrows(), verdicts):
        if row["status"] == "failed":
            click.echo(f"  ERROR {row['scan']}: {row['error']}")
        elif verdict is False:
            click.echo(f"  QC FAIL {row['scan']}: {row['qc_reasons']}")
    click.echo(f"qc table: {result.output / 'qc.tsv'}")
    click.echo(f"report:   {result.report}")
    if result.n_failed:
        sys.exit(1)


@main.command("qc-apply")
@click.argument("decisions", type=click.Path(exists=True, dir_okay=False))
@click.argument("bids_root", type=click.Path(exists=True, file_okay=False))
def qc_apply(decisions, bids_root):
    """Record a rater's include/exclude decisions (DECISIONS: the qc_decisions.tsv that normalize's report.html
    downloads) in BIDS_ROOT's qc.tsv, beside the automatic QC verdict, and redraw report.html.

    overlap-map and split then follow them: exclude always excludes a scan, include keeps a scan that failed
    the automatic QC. Applying again replaces the decisions of the scans listed; the others keep theirs. A
    file with any problem (column, decision, empty rater, unknown or unprocessed scan) changes nothing."""
    from .qc_decisions import apply_decisions

    click.echo(apply_decisions(decisions, bids_root).summary())


@main.command("overlap-map")
@click.argument("bids_root", type=click.Path(exists=True, file_okay=False))
@click.option("--output", default=None, type=click.Path(file_okay=False),
              help="Output folder (default BIDS_ROOT/derivatives/atlas-curate/overlap).")
@click.option("--lesions", default="all", show_default=True, type=click.Choice(["primary", "all"]),
              help="primary: label 1 of the dseg only; all: the union of every lesion.")
@click.option("--where", "where_expr", default=None, metavar="EXPR",
              help="Filter on participants/sessions columns, e.g. \"fazekas_pvh >= 2\".")
@click.option("--include-failed", is_flag=True, help="Keep scans that failed registration QC.")
@click.option("--per-subject", default="first", show_default=True, type=click.Choice(["first", "all"]),
              help="first: one scan per subject (its first session); all: every session.")
@_executor_options("overlap-map")
def overlap_map(bids_root, output, lesions, where_expr, include_failed, per_subject, jobs, executor, scheduler):
    """Probabilistic lesion overlap map, figures, dataset tables and per-lesion report."""
    from .overlap import overlap_map as run_overlap
    from .overlap import summary

    result = run_overlap(bids_root, output=output, lesions=lesions, where=where_expr, include_failed=include_failed,
                         per_subject=per_subject, jobs=jobs, executor=executor, scheduler=scheduler)
    click.echo(summary(result))


@main.command()
@click.argument("bids_root", type=click.Path(exists=True, file_okay=False))
@click.option("--seed", default=0, show_default=True, type=int, help="Random seed; same seed, same split.")
@click.option("--fractions", default="0.76,0.11,0.13", show_default=True,
              help="train,dev,test fractions (the paper's 182/26/31 scans).")
@click.option("--folds", default=None, type=click.IntRange(2), help="K folds over train+dev for cross-validation.")
@click.option("--output", default=None, type=click.Path(dir_okay=False),
              help="Split file (TSV, JSON beside it); default BIDS_ROOT/derivatives/atlas-curate/split.tsv.")
@click.option("--include-failed", is_flag=True, help="Keep scans that failed registration QC.")
@click.option("--keep-release-division", is_flag=True,
              help="R2.0: keep the release's training/testing division (split only the training scans).")
def split(bids_root, seed, fractions, folds, output, include_failed, keep_release_division):
    """Seeded train/dev/test split grouped by subject, stratified by cohort and lesion-volume quartile."""
    from pathlib import Path

    from .split import balance_table, make_split, parse_fractions, write_split

    table = make_split(bids_root, seed=seed, fractions=parse_fractions(fractions), folds=folds,
                       include_failed=include_failed, keep_release_division=keep_release_division)
    path = Path(output) if output else Path(bids_root) / naming.PIPELINE_DERIVATIVE / "split.tsv"
    tsv, js = write_split(table, path)
    click.echo(balance_table(table).to_string())
    excluded = table[table["split"] == "excluded"]
    for _, row in excluded.iterrows():
        click.echo(f"  excluded {row['scan']}: {row['excluded']}")
    click.echo(f"split: {tsv}\n       {js}")


@main.group()
def export():
    """Export the curated dataset for other tools."""


@export.command("nnunet")
@click.argument("bids_root", type=click.Path(exists=True, file_okay=False))
@click.argument("splits", type=click.Path(exists=True, dir_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--dataset-id", default=501, show_default=True, type=click.IntRange(1, 999),
              help="nnU-Net dataset id: the export is OUT/Dataset{ID:03d}_{NAME}.")
@click.option("--name", default="ATLAS", show_default=True, help="Dataset name (letters, digits, '_', '-').")
@click.option("--seed", default=None, type=int,
              help="Seed of the five folds of a split made without --folds (default: the split's seed).")
@click.option("--copy", "copy_files", is_flag=True, help="Copy files instead of hard-linking them.")
@click.option("--overwrite", is_flag=True,
              help="Replace a different dataset with this id in OUT: OUT/Dataset{ID:03d}_{NAME} holding another "
                   "export, or a Dataset{ID:03d}_* of another name (deleted). Exporting the same split again "
                   "needs no flag.")
@_executor_options("export")
def export_nnunet(bids_root, splits, out, dataset_id, name, seed, copy_files, overwrite, jobs, executor, scheduler):
    """nnU-Net v2 raw dataset from a split. OUT is the nnUNet_raw folder itself: the export creates
    OUT/Dataset{ID:03d}_{NAME} (default OUT/Dataset501_ATLAS) inside it, with imagesTr/labelsTr (train and dev
    scans), imagesTs/labelsTs (test scans), dataset.json, splits_final.json, folds.json and cases.tsv. An OUT
    named like a dataset folder (Dataset123_X) is refused.

    splits_final.json holds a subject-grouped fold for every fold nnU-Net trains, so it never draws its own
    random split: the split's K folds (split --folds K), else five: fold 0 validates on the split's dev scans,
    folds 1-4 on four seeded groups of its train scans, stratified by cohort and lesion-volume quartile.

    \b
    Then, with nnU-Net v2:
      export nnUNet_raw=OUT
      nnUNetv2_plan_and_preprocess -d ID --verify_dataset_integrity
      nnUNetv2_train ID 3d_fullres FOLD      (FOLD = 0, 1, 2, 3, 4)
      nnUNetv2_predict -i OUT/Dataset{ID:03d}_{NAME}/imagesTs -o PRED -d ID -c 3d_fullres
      atlas-curate evaluate --predictions PRED --split SPLITS

    nnU-Net >= 2.8 copies splits_final.json to nnUNet_preprocessed/Dataset{ID:03d}_{NAME}/ itself and stops
    when an older, different copy is there: delete that copy after exporting a new split."""
    from .export import export_nnunet as run_export
    from .export import next_steps

    path = run_export(bids_root, splits, out, dataset_id=dataset_id, name=name, overwrite=overwrite,
                      link=not copy_files, seed=seed, jobs=jobs, executor=executor, scheduler=scheduler,
                      progress=True)
    for line in next_steps(path, splits):
        click.echo(line)


@main.command("train-baseline")
@click.argument("bids_root", type=click.Path(exists=True, file_okay=False))
@click.option("--splits", required=True, type=click.Path(exists=True, dir_okay=False), help="Split TSV from `split`.")
@click.option("--output", "run_dir", required=True, type=click.Path(file_okay=False), help="Run folder.")
@click.option("--preset", default=None, type=click.Choice(["paper", "quick"]),
              help="paper: Tomita et al. 2020 schedule at 1 mm; quick: CPU-friendly 2 mm schedule "
                   "[default: quick; with --resume: the run's].")
@click.option("--config", "config_file", default=None, type=click.Path(exists=True, dir_okay=False),
              help="TOML file overriding preset fields (with --resume: overriding the run's config.toml, e.g. more "
                   "epochs in a stage or a stage added at the end).")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cuda", "cpu"]))
@click.option("--resume", is_flag=True, help="Continue from the run folder's last checkpoint; with --config, extend "
                                            "the run (also a finished one).")
@click.option("--fold", default=None, type=int, help="Train on this fold of a k-fold split.")
def train_baseline(bids_root, splits, run_dir, preset, config_file, device, resume, fold):
    """Train the 3D residual U-Net baseline (Tomita et al. 2020) on the split's train scans."""
    from .train import train

    result = train(bids_root, splits, run_dir, preset=preset, config=config_file, device=device, resume=resume,
                   fold=fold)
    click.echo(result.summary())
    click.echo(f"run folder: {result.run_dir} (config.toml, log.tsv, model.pt, checkpoints/)")


_CONNECTIVITY_HELP = ("Lesion connectivity of the lesion-wise figures: 6 = the ATLAS 2022 challenge scorer "
                      "(faces only), 26 = ISLES'22 (faces, edges, corners).")


@main.command()
@click.argument("run_dir", required=False, type=click.Path(exists=True, file_okay=False))
@click.option("--predictions", default=None, type=click.Path(exists=True, file_okay=False),
              help="Score this folder of lesion masks (any model's, e.g. nnU-Net's) instead of segmenting with a "
                   "run; needs --split FILE.")
@click.option("--split", "split_arg", default=None, metavar="NAME|FILE",
              help="With RUN_DIR: which split to score (default test). With --predictions: the split table "
                   "(TSV/JSON from `split`).")
@click.option("--subset", default="test", show_default=True,
              help="With --predictions: which split of the table to score.")
@click.option("--cases", default=None, type=click.Path(exists=True, dir_okay=False),
              help="With --predictions: cases.tsv of `export nnunet` (case id -> scan); default: the first found "
                   "in or above the predictions folder, or in or above the input folder nnUNetv2_predict recorded "
                   "there.")
@click.option("--bids-root", default=None, type=click.Path(exists=True, file_okay=False),
              help="With --predictions: the BIDS dataset of the split (default: found above the split file).")
@click.option("--output", default=None, type=click.Path(file_okay=False),
              help="With --predictions: output folder (default PREDICTIONS/eval-<subset>).")
@click.option("--connectivity", default="6", show_default=True, type=click.Choice(["6", "26"]),
              help=_CONNECTIVITY_HELP)
@click.option("--ensemble", is_flag=True, help="Snapshot ensemble (mean of the zoom-out snapshots).")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cuda", "cpu"]))
@_executor_options("evaluate")
def evaluate(run_dir, predictions, split_arg, subset, cases, bids_root, output, connectivity, ensemble, device,
             jobs, executor, scheduler):
    """Score a split: DSC, HD, HD95, ASSD, TPR, precision, lesion-wise F1, count and volume differences,
    bootstrap CIs, per cohort and per lesion-size quartile.

    `evaluate RUN_DIR` segments the split with a trained run; `evaluate --predictions DIR --split FILE` scores
    a folder of masks from any model (file names: ours, or nnU-Net case ids mapped through cases.tsv)."""
    if (run_dir is None) == (predictions is None):
        raise click.UsageError("give either RUN_DIR or --predictions DIR (with --split FILE)")
    if predictions is None:
        given = [name for name, value in (("--subset", subset != "test"), ("--cases", cases),
                                          ("--bids-root", bids_root), ("--output", output)) if value]
        if given:
            raise click.UsageError(f"{', '.join(given)}: only with --predictions")
        from .evaluate import evaluate as run_evaluate

        result = run_evaluate(run_dir, split=split_arg or "test", ensemble=ensemble, device=device, jobs=jobs,
                              executor=executor, scheduler=scheduler, connectivity=int(connectivity))
    else:
        if split_arg is None:
            raise click.UsageError("--predictions needs --split FILE (the split table from `split`)")
        if ensemble:
            raise click.UsageError("--ensemble needs a run (RUN_DIR), not --predictions")
        from .evaluate import evaluate_predictions

        result = evaluate_predictions(predictions, split_arg, split=subset, bids_root=bids_root, cases=cases,
                                      output=output, jobs=jobs, executor=executor, scheduler=scheduler,
                                      connectivity=int(connectivity))
    click.echo(result.text())


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("t1s", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--output", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--native", is_flag=True, help="Inputs are native-space heads: normalise, segment, map back.")
@click.option("--ensemble", is_flag=True, help="Snapshot ensemble.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cuda", "cpu"]))
@click.option("--no-postprocess", "no_postprocess", is_flag=True,
              help="Write the thresholded network output as the mask, without the run's post-processing (by "
                   "default it is applied and the raw mask is written beside it, desc-ResUNetRaw).")
def predict(run_dir, t1s, output, native, ensemble, device, no_postprocess):
    """Segment T1w images with a trained run; one mask (post-processed, and the raw one) and the probabilities
    per input."""
    from .predict import predict as run_predict

    result = run_predict(run_dir, list(t1s), output, native=native, ensemble=ensemble, device=device,
                         postprocess=not no_postprocess)
    shown = ("input", "status", "mask", "mask_raw", "error")
    for _, row in result.table.iterrows():
        click.echo("  " + "  ".join(f"{k}={v}" for k, v in row.items() if k in shown and isinstance(v, str) and v))
    click.echo(f"post-processing: {result.postprocessing}")
    click.echo(f"predictions: {result.output}")
    if result.n_failed:
        sys.exit(1)


@main.command()
@click.argument("masks", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON (one object per pair) instead of a table.")
@click.option("--connectivity", default="6", show_default=True, type=click.Choice(["6", "26"]),
              help=_CONNECTIVITY_HELP)
def agreement(masks, as_json, connectivity):
    """Agreement between two or more lesion masks of the same brain (DSC, HD, HD95 and pooled HD95, ASSD,
    volumes in mm³ and voxels, lesion-wise F1 and count difference).

    Every pair is compared; masks on different grids are an error (nothing is resampled). HD95 is the larger
    directed 95th percentile (Metrics Reloaded, MONAI), hd95_pooled MedPy's pooled one; lesions are
    6-connected as in the ATLAS 2022 challenge scorer unless --connectivity 26 (ISLES'22)."""
    from .metrics import LESION_CONVENTIONS
    from .metrics import agreement as compute

    if len(masks) < 2:
        raise click.UsageError("give at least two masks")
    table = compute(list(masks), connectivity=int(connectivity))
    if as_json:
        import json
        import math

        def plain(value):
            value = value.item() if hasattr(value, "item") else value   # numpy scalars; full float precision
            return None if isinstance(value, float) and not math.isfinite(value) else value

        records = [{key: plain(value) for key, value in row.items()} for row in table.to_dict("records")]
        click.echo(json.dumps(records, indent=2))
    else:
        click.echo(f"lesion-wise: {LESION_CONVENTIONS[int(connectivity)]}")
        click.echo(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))


@main.command()
@click.argument("out", type=click.Path(file_okay=False), default="demo-output")
@click.option("--subjects", default=None, type=click.IntRange(1, 200),
              help="Subjects to synthesize [default: 6; 10 with --full].")
@click.option("--seed", default=0, show_default=True, type=int)
@_jobs_option("normalize", "Worker processes for every stage")
@click.option("--flavour", default="native", show_default=True, type=click.Choice(["native", "atlas2"]),
              help="native: an R1.1 ICPSR release (registration included); atlas2: an R2.0 release.")
@click.option("--full", is_flag=True, help="The larger demo: 10 subjects and the full quick training preset "
                                          "(about 20 minutes on 2 cores instead of a few).")
@click.option("--faults/--no-faults", default=None,
              help="Add broken scans (truncated file, mask on another grid, empty mask, metadata row without a scan "
                   "and the reverse) [default: only with --full].")
@click.option("--no-train", is_flag=True, help="Stop after split (no training, evaluation or prediction).")
def demo(out, subjects, seed, jobs, flavour, full, faults, no_train):
    """Build a small synthetic release in OUT and run every stage on it (synth, bids-convert, normalize,
    overlap-map, split, train-baseline, evaluate, predict) with progress bars; prints the wall time of each
    stage and, last, the index page that links every output."""
    from .demo import run_demo

    run_demo(out, subjects=subjects, seed=seed, jobs=jobs, flavour=flavour, train=not no_train, full=full,
             faults=faults)


def run() -> None:
    """Console entry point: user-facing errors become one clear line and exit status 2."""
    from .convert.discover import ReleaseError
    from .io import InputError

    try:
        main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (ReleaseError, InputError, FileExistsError, FileNotFoundError, ValueError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    run()

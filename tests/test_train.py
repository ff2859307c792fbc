"""train-baseline: network structure, loss, configuration, data pipeline, sliding windows, checkpoints, resume."""

from __future__ import annotations

import json
import math
import re
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")

from atlas_curate import io, naming  # noqa: E402
from atlas_curate.templates import get_template, template_arrays  # noqa: E402
from atlas_curate.train import config as cfgmod  # noqa: E402
from atlas_curate.train import data, infer, model  # noqa: E402
from atlas_curate.train.loop import train  # noqa: E402
from atlas_curate.train.resume import plan_resume  # noqa: E402

SPACE = "MNI152NLin2009aSym"
MICRO = {
    "voxel_size": 4, "widths": [8, 8, 8, 8, 8], "encoder_blocks": [1, 1, 1, 2], "num_workers": 0, "overlap": 0.0,
    "dev_every": 10, "lesion_crop_prob": 0.9,
    "stages": [
        {"name": "zoom_in", "crop": [16, 16, 16], "epochs": 3, "lr": 3e-3, "restart_period": 2, "batch_size": 2,
         "iterations_per_epoch": 2},
        {"name": "zoom_out", "crop": [40, 48, 40], "epochs": 2, "lr": 1e-3, "restart_period": 1, "batch_size": 1,
         "iterations_per_epoch": 2, "snapshot_epochs": [1, 2]},
    ],
}


# ------------------------------------------------------------------------------------------ a tiny dataset

def write_toy_dataset(root, n_scans: int = 7, seed: int = 0) -> pd.DataFrame:
    """Template-grid T1s (the template brain, WM ≈ 100) with one dark ball lesion each, in the layout of
    ``normalize`` output, plus participants/sessions tables; returns the split table (4 train, 1 dev, rest test)."""
    rng = np.random.default_rng(seed)
    tpl = get_template()
    brain = template_arrays()["T1w"]
    affine = tpl.affine
    inside = np.argwhere(template_arrays()["WM"] > 0.9)
    rows, sessions = [], []
    for k in range(n_scans):
        sub = f"t{k:02d}"
        centre = inside[rng.integers(len(inside))]
        radius = rng.uniform(5, 10)
        lo = np.maximum(centre - 11, 0)
        local = np.indices((23, 23, 23)).reshape(3, -1).T + lo
        local = local[(((local - centre) ** 2).sum(1) <= radius ** 2) & (local < brain.shape).all(1)]
        lesion = np.zeros(brain.shape, bool)
        lesion[tuple(local.T)] = True
        t1 = brain * 125.0
        t1[lesion] = 25.0
        base = root / naming.PIPELINE_DERIVATIVE
        t1_path = base / naming.bids_path(sub, "1", "T1w", space=SPACE, desc="preproc")
        mask_path = base / naming.bids_path(sub, "1", "mask", space=SPACE, label="L", desc="T1lesion")
        for array, path, dtype in ((t1, t1_path, np.float32), (lesion, mask_path, np.uint8)):
            img = nib.Nifti1Image(np.asarray(array, dtype=dtype), affine)
            img.set_sform(affine, code=4)
            io.save_nifti(img, path)
        split = "train" if k < 4 else "dev" if k == 4 else "test"
        rows.append({"scan": f"sub-{sub}_ses-1", "subject": sub, "session": "1", "split": split, "cohort": "toy",
                     "lesion_volume_mm3": float(lesion.sum()), "t1": str(t1_path), "mask": str(mask_path)})
        sessions.append(sub)
        io.write_text("session_id\tvascular_territory\tprimary_lesion_location\n"
                      f"ses-1\t{['MCA', 'PCA'][k % 2]}\tSubcortical\n", root / naming.sessions_table(sub))
    io.write_text("participant_id\tcohort\n" + "".join(f"sub-{s}\ttoy\n" for s in sessions),
                  root / "participants.tsv")
    io.write_text('{"Name": "toy", "BIDSVersion": "1.10.0"}', root / "dataset_description.json")
    table = pd.DataFrame(rows)
    io.write_text(table.to_csv(sep="\t", index=False), root / "splits.tsv")
    return table


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy") / "bids"
    table = write_toy_dataset(root)
    return root, root / "splits.tsv", table


@pytest.fixture(scope="module")
def trained(toy, tmp_path_factory):
    root, splits, _ = toy
    run = tmp_path_factory.mktemp("run") / "run"
    result = train(root, splits, run, config=MICRO, device="cpu", progress=False)
    return run, result


# ------------------------------------------------------------------------------------------ network

def test_model_shapes_and_block_structure():
    net = model.ResUNet3D((8, 16, 16, 32, 32), (1, 2, 1, 4))
    x = torch.randn(2, 1, 16, 24, 32)
    assert net(x).shape == (2, 1, 16, 24, 32)
    with pytest.raises(ValueError, match="multiple of 8"):
        net(torch.randn(1, 1, 12, 16, 16))
    blocks = [m for m in net.modules() if isinstance(m, model.ResidualBlock)]
    assert len(blocks) == 1 + 2 + 1 + 4 + 3          # encoder levels + one decoder block per upsampling
    for block in blocks:
        assert block.norm1.num_groups == 8 and block.norm2.num_groups == 8
        changes = block.conv1.in_channels != block.conv1.out_channels or block.conv1.stride != (1, 1, 1)
        if changes:
            projection = block.shortcut[0]
            assert isinstance(projection, torch.nn.Conv3d) and projection.kernel_size == (1, 1, 1)
            assert projection.stride == block.conv1.stride
            assert isinstance(block.shortcut[1], torch.nn.GroupNorm) and block.shortcut[1].num_groups == 8
        else:
            assert isinstance(block.shortcut, torch.nn.Identity)
    strides = [level[0].conv1.stride for level in net.encoder]
    assert strides == [(1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2)]    # three downsamplings
    assert len(net.encoder[-1]) == 4
    assert all(isinstance(u, torch.nn.ConvTranspose3d) and u.stride == (2, 2, 2) for u in net.up)
    assert net.head.kernel_size == (1, 1, 1) and net.head.out_channels == 1


def test_paper_network_size_and_kaiming_init():
    torch.manual_seed(0)
    net = model.build_model(cfgmod.paper_config())
    widths = [net.stem[0].out_channels] + [level[-1].conv2.out_channels for level in net.encoder]
    assert widths == [16, 32, 64, 128, 256]
    n = model.count_parameters(net)
    # dominated by the bottleneck: 4 blocks × 2 convolutions of 256 × 256 × 27 weights ≈ 14.2 M
    assert 14e6 < n < 20e6, n
    weight = net.encoder[-1][1].conv1.weight        # 256 → 256, 3×3×3: fan_out = 256 · 27
    assert abs(float(weight.detach().std()) - math.sqrt(2.0 / (256 * 27))) < 0.002
    assert float(net.encoder[0][0].norm1.weight.detach().mean()) == 1.0


def test_loss_perfect_and_hand_case():
    target = torch.zeros(1, 1, 2, 2, 2)
    target[0, 0, 0, 0, :] = 1
    perfect = (target * 2 - 1) * 30.0
    total, bce, dice = model.bce_dice_loss(perfect, target)
    assert float(dice) < 1e-6 and float(bce) < 1e-6 and float(total) < 1e-6
    # p = 0.5 everywhere: Σp = 4, Σt = 2, Σpt = 1 → Dice = (2 + 1) / (4 + 2 + 1) = 3/7; BCE = ln 2
    total, bce, dice = model.bce_dice_loss(torch.zeros(1, 1, 2, 2, 2), target, bce_weight=0.1, dice_weight=0.9)
    assert float(dice) == pytest.approx(4 / 7, abs=1e-6)
    assert float(bce) == pytest.approx(math.log(2), abs=1e-6)
    assert float(total) == pytest.approx(0.1 * math.log(2) + 0.9 * 4 / 7, abs=1e-6)
    # an empty crop predicted empty costs (almost) nothing, a missed lesion costs the most
    empty = torch.zeros(1, 1, 2, 2, 2)
    assert float(model.soft_dice_loss(torch.full_like(empty, -30.0), empty)) < 1e-6
    assert float(model.soft_dice_loss(torch.full_like(target, -30.0), target)) == pytest.approx(2 / 3, abs=1e-6)


# ------------------------------------------------------------------------------------------ configuration

def test_presets_follow_the_paper_schedule():
    paper = cfgmod.preset_config("paper").validate()
    zoom_in, zoom_out = paper.stages
    assert zoom_in.crop == (128, 128, 128) and zoom_in.lr == 1e-3 and zoom_in.epochs == 1200
    assert zoom_out.crop == (144, 172, 168) and zoom_out.lr == 1e-4 and zoom_out.epochs == 150
    assert zoom_out.snapshot_epochs == (50, 100, 150)
    assert (paper.bce_weight, paper.dice_weight, paper.weight_decay, paper.voxel_size) == (0.1, 0.9, 1e-4, 1)
    quick = cfgmod.preset_config("quick").validate()
    assert quick.voxel_size > 1 and len(quick.widths) == len(paper.widths)
    assert quick.encoder_blocks == paper.encoder_blocks
    with pytest.raises(ValueError, match="unknown preset"):
        cfgmod.preset_config("fast")


def test_config_toml_round_trip_and_overrides(tmp_path):
    config = cfgmod.make_config("quick")
    path = cfgmod.save_config(config, tmp_path / "config.toml")
    assert cfgmod.load_config(path) == config
    override = tmp_path / "override.toml"
    override.write_text('seed = 7\nflip_axes = [0, 2]\n[stages.zoom_out]\nepochs = 3\nsnapshot_epochs = [3]\n')
    changed = cfgmod.make_config("quick", override)
    assert changed.seed == 7 and changed.flip_axes == (0, 2)
    assert changed.stages[1].epochs == 3 and changed.stages[1].snapshot_epochs == (3,)
    assert changed.stages[0] == config.stages[0] and changed.stages[1].lr == config.stages[1].lr
    replaced = tmp_path / "stages.toml"
    replaced.write_text('[[stages]]\nname = "only"\ncrop = [16, 16, 16]\nepochs = 2\nlr = 0.01\n'
                        'restart_period = 1\n')
    only = cfgmod.make_config("paper", replaced)
    assert [s.name for s in only.stages] == ["only"] and only.stages[0].batch_size == 1
    assert cfgmod.load_config(cfgmod.save_config(only, tmp_path / "only.toml")) == only


@pytest.mark.parametrize("text, message", [
    ("sed = 1\n", "unknown keys"),
    ("[stages.zoom_out]\ncrop = [4, 32, 32]\n", "at least 8"),
    ("[stages.missing]\nepochs = 1\n", "no stage 'missing'"),
    ("seed = \n", "not valid TOML"),
])
def test_bad_config_names_the_file(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(io.InputError, match=message) as info:
        cfgmod.make_config("quick", path)
    assert info.value.path == path


# ------------------------------------------------------------------------------------------ data

def test_working_grid_round_trip():
    geo = data.geometry(2, 4)
    assert geo.template_shape == (197, 233, 189)
    brain = template_arrays()["T1w"] > 0
    assert brain[geo.box].sum() == brain.sum()               # the box holds the whole template brain
    assert geo.working_shape == tuple(-(-s // 2) for s in geo.box_shape)
    constant = np.full(geo.working_shape, 0.7, np.float32)
    back = data.prob_to_template(constant, geo)
    assert back.shape == geo.template_shape
    assert np.allclose(back[geo.box], 0.7) and back.sum() == pytest.approx(0.7 * np.prod(geo.box_shape), rel=1e-5)
    block = np.zeros((4, 4, 2), np.float32)
    block[:2, :2, :] = 1
    block[2, 2, 0] = 1
    assert data.block_mean(block, 2)[:, :, 0].tolist() == [[1.0, 0.0], [0.0, 0.125]]
    mask = np.zeros(geo.template_shape, bool)
    x, y, z = geo.box_start
    mask[x:x + 2, y:y + 2, z:z + 1] = True                     # half of one 2-mm block
    mask[x + 4, y + 4, z + 4] = True                           # one eighth of another
    target = data.mask_to_working(mask, geo)
    assert target[0, 0, 0] == 0.5 and target[2, 2, 2] == 0.125 and target.sum() == 0.625


def test_extract_pads_and_crop_contains_lesion():
    array = np.arange(27, dtype=np.float32).reshape(3, 3, 3)
    out = data.extract(array, (-1, 1, 0), (3, 3, 3), fill=-1)
    assert out[0].min() == -1 and out[1, 0, 0] == array[0, 1, 0] and (out[:, 2, :] == -1).all()
    rng = np.random.default_rng(0)
    lesion = np.array([[30, 5, 17]])
    for _ in range(50):
        start = data.crop_start(rng, (40, 40, 20), (16, 16, 24), lesion, 1.0)
        assert all(s <= v < s + c for s, v, c in zip(start, lesion[0], (16, 16, 24)))
        assert start[2] == -4 or -4 <= start[2] <= 0        # crop larger than the volume: padded


def test_crops_are_seeded_per_item(trained):
    run, result = trained
    scans = [data.PreparedScan(**json.loads(p.read_text()))
             for p in sorted((run / "cache").glob("*.json"))]
    ds = data.CropDataset(scans, (16, 16, 16), 4, seed=0, lesion_prob=0.5, flip_axes=(0,))
    ds.set_epoch(0, 3)
    first = [ds[i][0] for i in range(4)]
    again = data.CropDataset(scans, (16, 16, 16), 4, seed=0, lesion_prob=0.5, flip_axes=(0,))
    again.set_epoch(0, 3)
    assert all(torch.equal(a, again[i][0]) for i, a in enumerate(first))
    again.set_epoch(0, 4)
    assert not all(torch.equal(a, again[i][0]) for i, a in enumerate(first))
    image, mask = ds[0]
    assert image.shape == (1, 16, 16, 16) and mask.dtype == torch.float32


def test_read_split_errors(tmp_path):
    with pytest.raises(io.InputError, match="not found"):
        data.read_split(tmp_path / "none.tsv")
    bad = tmp_path / "bad.tsv"
    bad.write_text("scan\tfold\nsub-1_ses-1\t0\n")
    with pytest.raises(io.InputError, match="missing columns"):
        data.read_split(bad)


# ------------------------------------------------------------------------------------------ inference

class _Pointwise(torch.nn.Module):
    """A 1×1×1 model: its output at a voxel depends on that voxel only, so any tiling must agree."""

    size_multiple = 8

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 1, 1)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize("shape, crop, overlap", [((13, 17, 11), (8, 8, 8), 0.5), ((40, 24, 9), (16, 8, 8), 0.25),
                                                  ((8, 8, 8), (8, 8, 8), 0.5)])
def test_sliding_windows_cover_every_voxel(shape, crop, overlap):
    padded = infer.padded_shape(shape, 8)
    assert all(p % 8 == 0 and s <= p < s + 8 for p, s in zip(padded, shape))
    window = tuple(min(c, p) for c, p in zip(crop, padded))
    count = np.zeros(padded, int)
    for box in infer.sliding_windows(padded, window, overlap):
        assert all(b.stop <= p for b, p in zip(box, padded))
        count[box] += 1
    assert count.min() >= 1
    torch.manual_seed(0)
    net = _Pointwise()
    image = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    for blend in ("gaussian", "uniform"):
        prob = infer.predict_volume(net, image, crop, "cpu", overlap=overlap, blend=blend)
        with torch.no_grad():
            direct = torch.sigmoid(net(torch.from_numpy(image)[None, None]))[0, 0].numpy()
        assert prob.shape == shape
        assert np.allclose(prob, direct, atol=1e-5)


def test_one_window_equals_direct_inference():
    torch.manual_seed(0)
    net = model.ResUNet3D((8, 8, 8, 8, 8), (1, 1, 1, 1))
    image = np.random.default_rng(2).normal(size=(16, 24, 16)).astype(np.float32)
    net.train()
    prob = infer.predict_volume(net, image, (32, 32, 32), "cpu")
    assert net.training                                     # the caller's mode is restored
    net.eval()
    with torch.no_grad():
        direct = torch.sigmoid(net(torch.from_numpy(image)[None, None]))[0, 0].numpy()
    assert np.allclose(prob, direct, atol=1e-6)
    # a smaller window still covers everything and stays a probability
    tiled = infer.predict_volume(net, image, (8, 16, 8), "cpu", overlap=0.5)
    assert tiled.shape == image.shape and 0 <= tiled.min() and tiled.max() <= 1
    ensemble = infer.predict_ensemble([net, net], image, (32, 32, 32), "cpu")
    assert np.allclose(ensemble, prob, atol=1e-6)


def test_device_resolution():
    assert infer.resolve_device("cpu").type == "cpu"
    assert infer.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError):
        infer.resolve_device("tpu")


# ------------------------------------------------------------------------------------------ training runs

def test_training_run_outputs(trained):
    run, result = trained
    assert result.complete and result.model == run / "model.pt"
    for name in ("config.toml", "log.tsv", "run.json", "model.pt", "checkpoints/last.pt",
                 "checkpoints/zoom_out-epoch1.pt", "checkpoints/zoom_out-epoch2.pt"):
        assert (run / name).is_file(), name
    assert [p.name for p in result.snapshots] == ["zoom_out-epoch1.pt", "zoom_out-epoch2.pt"]
    log = pd.read_csv(run / "log.tsv", sep="\t")
    assert list(log.columns) == ["stage", "epoch", "train_loss", "bce", "dice_loss", "lr", "dev_dice", "seconds"]
    assert log["stage"].tolist() == ["zoom_in"] * 3 + ["zoom_out"] * 2
    assert log["epoch"].tolist() == [1, 2, 3, 1, 2]
    assert np.isfinite(log["train_loss"]).all()
    dev = log["dev_dice"].tolist()    # dev pass at the end of each stage (dev_every = 10)
    assert np.isnan(dev[0]) and np.isnan(dev[1]) and 0 <= dev[2] <= 1 and np.isnan(dev[3]) and 0 <= dev[4] <= 1
    # cosine annealing with warm restarts (T_0 = 2 epochs): full rate, half, full again
    assert log["lr"].tolist()[:3] == pytest.approx([3e-3, 1.5e-3, 3e-3])
    assert log["lr"].tolist()[3:] == pytest.approx([1e-3, 1e-3])      # zoom-out: T_0 = 1, fresh optimiser
    assert cfgmod.load_config(run / "config.toml") == cfgmod.make_config("quick", MICRO)
    doc = json.loads((run / "run.json").read_text())
    assert doc["status"] == "complete" and len(doc["train_scans"]) == 4 and doc["dev_scans"] == ["sub-t04_ses-1"]


def test_training_chooses_the_postprocessing_on_the_dev_scans(trained):
    """postprocess.json: every size of the grid tried on the dev scan with the final model, the best mean dev
    Dice chosen (ties: the smallest), summarised in run.json and in the summary line."""
    run, result = trained
    record = json.loads((run / "postprocess.json").read_text())
    assert record == result.postprocess
    assert record["chosen_on"] == "dev" and record["n_dev_scans"] == 1 and record["model"] == "model.pt"
    grid = record["grid"]
    assert [row["min_size_mm3"] for row in grid] == [0, 10, 20, 50, 100, 200, 500]
    best = max(row["dev_dice"] for row in grid)
    smallest = min(row["min_size_mm3"] for row in grid if row["dev_dice"] == best)
    assert record["postprocessing"] == {"min_size_mm3": smallest, "brain_margin_mm": 3.0, "min_inside_fraction": 0.5,
                                        "connectivity": 6}
    assert record["dev_dice"] == best >= record["dev_dice_raw"]
    # the raw dev Dice is the final dev Dice of the log (the same model, the same dev pass)
    assert record["dev_dice_raw"] == pytest.approx(result.log["dev_dice"].iloc[-1], abs=1e-6)
    doc = json.loads((run / "run.json").read_text())
    assert doc["postprocess"]["min_size_mm3"] == smallest and doc["postprocess"]["file"] == "postprocess.json"
    assert "post-processing: components" in result.summary() and "chosen on the dev scans" in result.summary()


def test_checkpoints_load_with_weights_only(trained, tmp_path):
    run, _ = trained
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "rng", "stage", "epoch", "log"} <= set(state)
    assert state["stage"] == 2 and state["epoch"] == 0 and len(state["log"]) == 5
    weights = torch.load(run / "model.pt", weights_only=True)
    assert all(torch.equal(weights[k], v) for k, v in state["model"].items())

    evil = tmp_path / "evil.pt"
    torch.save({"x": tmp_path}, evil)          # a pickled Python object, not a tensor: refused
    with pytest.raises(io.InputError, match="not a loadable weights file"):
        infer.load_state(evil)


def test_existing_run_is_not_overwritten(toy, trained):
    root, splits, _ = toy
    run, _ = trained
    with pytest.raises(FileExistsError, match="--resume"):
        train(root, splits, run, config=MICRO, device="cpu", progress=False)
    with pytest.raises(ValueError, match="another configuration"):
        train(root, splits, run, config={**MICRO, "seed": 3}, device="cpu", progress=False, resume=True)


def test_resume_gives_the_same_weights(toy, trained, tmp_path):
    root, splits, _ = toy
    run, full = trained
    part = tmp_path / "part"
    stopped = train(root, splits, part, config=MICRO, device="cpu", progress=False, max_epochs=2)
    assert not stopped.complete and stopped.model is None and len(stopped.log) == 2
    state = torch.load(part / "checkpoints" / "last.pt", weights_only=True)
    assert (state["stage"], state["epoch"]) == (0, 2)
    resumed = train(root, splits, part, config=MICRO, device="cpu", progress=False, resume=True)
    assert resumed.complete and resumed.resumed_at == ("zoom_in", 2)
    assert resumed.log["epoch"].tolist() == [1, 2, 3, 1, 2]            # continued, nothing repeated
    a = torch.load(run / "model.pt", weights_only=True)
    b = torch.load(part / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert np.allclose(full.log["train_loss"], resumed.log["train_loss"], rtol=0, atol=0)
    for name in ("zoom_out-epoch1.pt", "zoom_out-epoch2.pt"):
        sa = torch.load(run / "checkpoints" / name, weights_only=True)
        sb = torch.load(part / "checkpoints" / name, weights_only=True)
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_missing_image_is_named(toy, tmp_path):
    root, _, table = toy
    broken = table.copy()
    broken.loc[0, "t1"] = str(tmp_path / "gone_T1w.nii.gz")
    path = tmp_path / "splits.tsv"
    broken.to_csv(path, sep="\t", index=False)
    with pytest.raises(io.InputError, match="gone_T1w"):
        train(root, path, tmp_path / "run", config=MICRO, device="cpu", progress=False)


def test_resume_at_a_stage_boundary_gives_the_same_weights(toy, trained, tmp_path):
    """Stopped exactly at the end of a stage, the next stage starts with a fresh optimiser and schedule, as in the
    uninterrupted run (not with the finished stage's state)."""
    root, splits, _ = toy
    run, full = trained
    part = tmp_path / "boundary"
    train(root, splits, part, config=MICRO, device="cpu", progress=False, max_epochs=3)
    state = torch.load(part / "checkpoints" / "last.pt", weights_only=True)
    assert (state["stage"], state["epoch"]) == (1, 0)
    resumed = train(root, splits, part, config=MICRO, device="cpu", progress=False, resume=True)
    assert resumed.complete and resumed.resumed_at == ("zoom_out", 0)
    assert resumed.log["lr"].tolist()[3:] == pytest.approx([1e-3, 1e-3])
    a = torch.load(run / "model.pt", weights_only=True)
    b = torch.load(part / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert np.allclose(full.log["train_loss"], resumed.log["train_loss"], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ extending a run

def _weights(path):
    return torch.load(path, weights_only=True)


def test_resume_plan_rules():
    """Where a resumed run goes on, and what it may change, by the checkpoint's position (no training)."""
    saved = cfgmod.make_config("quick", MICRO)
    same = plan_resume(saved, saved, (0, 2))
    assert (same.stage, same.epoch, same.continue_stage, same.changes) == (0, 2, True, [])
    assert (plan_resume(saved, saved, (1, 0)).stage, plan_resume(saved, saved, (1, 0)).continue_stage) == (1, False)
    # interrupted in zoom_in: it may grow or shrink (above its 2 trained epochs); zoom_out has not started
    ahead = cfgmod.apply_overrides(saved, {"num_workers": 2, "threshold": 0.4, "stages": {
        "zoom_in": {"epochs": 6}, "zoom_out": {"crop": [48, 48, 48], "lr": 5e-4, "epochs": 1, "snapshot_epochs": [1]}}})
    plan = plan_resume(saved, ahead, (0, 2))
    assert (plan.stage, plan.epoch, plan.continue_stage) == (0, 2, True)
    assert {c.field for c in plan.changes} == {"num_workers", "threshold", "stages.zoom_in.epochs",
                                              "stages.zoom_out.crop", "stages.zoom_out.lr", "stages.zoom_out.epochs",
                                              "stages.zoom_out.snapshot_epochs"}
    with pytest.raises(ValueError, match=r"stages\.zoom_in\.epochs \(was 3, now 2\) \[cannot shrink to or below"):
        plan_resume(saved, cfgmod.apply_overrides(saved, {"stages": {"zoom_in": {"epochs": 2}}}), (0, 2))
    # at the stage boundary: the completed zoom_in may be extended (it goes on with its own optimiser state)
    longer = cfgmod.apply_overrides(saved, {"stages": {"zoom_in": {"epochs": 5}}})
    plan = plan_resume(saved, longer, (1, 0))
    assert (plan.stage, plan.epoch, plan.continue_stage) == (0, 3, True)
    # a finished run: extend the last stage, add one; snapshots may change only after the trained epochs
    grown = cfgmod.apply_overrides(saved, {"stages": {"zoom_out": {"epochs": 4, "snapshot_epochs": [1, 2, 4]}}})
    plan = plan_resume(saved, grown, (2, 0))
    assert (plan.stage, plan.epoch, plan.continue_stage) == (1, 2, True)
    assert [c.to_dict() for c in plan.changes] == [
        {"field": "stages.zoom_out.epochs", "from": 2, "to": 4},
        {"field": "stages.zoom_out.snapshot_epochs", "from": [1, 2], "to": [1, 2, 4]}]
    added = cfgmod.apply_overrides(saved, {"stages": [*MICRO["stages"], {**MICRO["stages"][0], "name": "polish"}]})
    plan = plan_resume(saved, added, (2, 0))
    assert (plan.stage, plan.epoch, plan.continue_stage) == (2, 0, False)
    assert plan.changes[0].field == "stages.polish" and plan.changes[0].before is None
    moved = cfgmod.apply_overrides(saved, {"stages": {"zoom_out": {"epochs": 4, "snapshot_epochs": [3, 4]}}})
    assert plan_resume(saved, moved, (2, 0)).stage == 1          # trained snapshots may be dropped from the list
    with pytest.raises(ValueError, match=r"stages\.zoom_in\.snapshot_epochs \(was \[\], now \[3\]\) \[epochs \[3\] "
                                         r"were trained without a snapshot\]"):
        plan_resume(saved, cfgmod.apply_overrides(saved, {"stages": {"zoom_in": {"snapshot_epochs": [3]}}}), (2, 0))
    with pytest.raises(ValueError, match=r"stages\.zoom_in \(renamed to 'warm'; it has trained 3 epochs\)"):
        plan_resume(saved, cfgmod.apply_overrides(saved, {"stages": [{**MICRO["stages"][0], "name": "warm"},
                                                                    MICRO["stages"][1]]}), (1, 0))


def test_extending_a_finished_run_by_epochs(toy, trained, tmp_path):
    """A complete run resumed with one more zoom-out epoch trains only that epoch; the log goes on, run.json
    records the change, and the weights are those of a run configured with the longer stage from the start."""
    root, splits, _ = toy
    run, _ = trained
    ext = shutil.copytree(run, tmp_path / "extended")
    before = pd.read_csv(ext / "log.tsv", sep="\t")
    old_model = _weights(ext / "model.pt")
    result = train(root, splits, ext, config={"stages": {"zoom_out": {"epochs": 3}}}, device="cpu", progress=False,
                   resume=True)
    assert result.complete and result.resumed_at == ("zoom_out", 2)
    log = pd.read_csv(ext / "log.tsv", sep="\t")
    assert log["stage"].tolist() == ["zoom_in"] * 3 + ["zoom_out"] * 3
    assert log["epoch"].tolist() == [1, 2, 3, 1, 2, 3]                  # numbering goes on, nothing repeated
    pd.testing.assert_frame_equal(log.iloc[:5], before)                  # the rows already there are kept
    assert log["lr"].iloc[5] == pytest.approx(1e-3) and 0 <= log["dev_dice"].iloc[5] <= 1
    doc = json.loads((ext / "run.json").read_text())
    assert doc["status"] == "complete" and doc["epochs_done"] == 6
    [entry] = doc["extensions"]
    assert entry["changes"] == [{"field": "stages.zoom_out.epochs", "from": 2, "to": 3}]
    assert entry["at"] == {"stage": "zoom_out", "epoch": 2, "epochs_done": 5} and entry["status_before"] == "complete"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", entry["time"])
    assert cfgmod.load_config(ext / "config.toml").stages[1].epochs == 3
    state = torch.load(ext / "checkpoints" / "last.pt", weights_only=True)
    assert (state["stage"], state["epoch"]) == (2, 0) and len(state["log"]) == 6
    new_model = _weights(ext / "model.pt")
    assert not all(torch.equal(old_model[k], new_model[k]) for k in old_model)          # model.pt updated
    assert all(torch.equal(new_model[k], v) for k, v in state["model"].items())
    assert "stages.zoom_out.epochs 2 -> 3" in result.summary()
    assert (ext / "curve.png").is_file() and json.loads((ext / "postprocess.json").read_text())["model"] == "model.pt"
    # the same as a run configured with three zoom-out epochs from the start
    longer = {**MICRO, "stages": [MICRO["stages"][0], {**MICRO["stages"][1], "epochs": 3}]}
    fresh = train(root, splits, tmp_path / "fresh", config=longer, device="cpu", progress=False)
    reference = _weights(tmp_path / "fresh" / "model.pt")
    assert all(torch.equal(reference[k], new_model[k]) for k in reference)
    assert np.array_equal(fresh.log["train_loss"].to_numpy(), result.log["train_loss"].to_numpy())
    # --resume alone goes on with the run's own configuration: nothing left to train, nothing recorded
    again = train(root, splits, ext, device="cpu", progress=False, resume=True)
    assert again.complete and len(again.log) == 6 and again.extension is None
    assert len(json.loads((ext / "run.json").read_text())["extensions"]) == 1


def test_adding_a_stage_to_a_finished_run(toy, trained, tmp_path):
    root, splits, _ = toy
    run, _ = trained
    ext = shutil.copytree(run, tmp_path / "added")
    before = pd.read_csv(ext / "log.tsv", sep="\t")
    polish = {"name": "polish", "crop": [16, 16, 16], "epochs": 2, "lr": 1e-4, "restart_period": 2, "batch_size": 2,
              "iterations_per_epoch": 2, "snapshot_epochs": [2]}
    result = train(root, splits, ext, config={"stages": [*MICRO["stages"], polish]}, device="cpu", progress=False,
                   resume=True)
    assert result.complete and result.resumed_at == ("polish", 0)
    log = pd.read_csv(ext / "log.tsv", sep="\t")
    assert log["stage"].tolist() == ["zoom_in"] * 3 + ["zoom_out"] * 2 + ["polish"] * 2
    assert log["epoch"].tolist() == [1, 2, 3, 1, 2, 1, 2]
    pd.testing.assert_frame_equal(log.iloc[:5], before)
    assert log["lr"].tolist()[5:] == pytest.approx([1e-4, 5e-5])       # a fresh optimiser and schedule
    doc = json.loads((ext / "run.json").read_text())
    [entry] = doc["extensions"]
    assert entry["at"] == {"stage": "polish", "epoch": 0, "epochs_done": 5}
    assert entry["changes"] == [{"field": "stages.polish", "from": None,
                                 "to": {**polish, "min_lr": 0.0}}]
    assert doc["snapshots"] == ["checkpoints/polish-epoch2.pt"] and (ext / "checkpoints" / "polish-epoch2.pt").is_file()
    assert [p.name for p in result.snapshots] == ["polish-epoch2.pt"]
    assert [s.name for s in cfgmod.load_config(ext / "config.toml").stages] == ["zoom_in", "zoom_out", "polish"]
    assert "added stage polish" in result.summary()
    state = torch.load(ext / "checkpoints" / "last.pt", weights_only=True)
    assert (state["stage"], state["epoch"]) == (3, 0)
    assert not all(torch.equal(a, b) for a, b in zip(_weights(run / "model.pt").values(),
                                                     _weights(ext / "model.pt").values()))


def test_resume_refuses_changes_that_cannot_continue_the_run(toy, trained):
    """Network, voxel size, a trained stage's crop, shrinking, extending a stage below another: refused with the
    field, its old and its new value; the run folder is left as it was."""
    root, splits, _ = toy
    run, _ = trained
    files = ("config.toml", "run.json", "log.tsv", "model.pt", "checkpoints/last.pt")
    before = {name: (run / name).read_bytes() for name in files}

    def refused(config):
        with pytest.raises(ValueError, match="cannot be changed when resuming") as info:
            train(root, splits, run, config=config, device="cpu", progress=False, resume=True)
        return str(info.value)

    message = refused({"widths": [8, 16, 16, 16, 16], "voxel_size": 2})
    assert "widths (was [8, 8, 8, 8, 8], now [8, 16, 16, 16, 16]) [network shape]" in message
    assert "voxel_size (was 4, now 2) [data preparation]" in message and str(run / "config.toml") in message
    assert "stages.zoom_in.crop (was [16, 16, 16], now [24, 24, 24])" in refused(
        {"stages": {"zoom_in": {"crop": [24, 24, 24]}}})
    assert "stages.zoom_out.epochs (was 2, now 1) [cannot shrink below the 2 epochs trained]" in refused(
        {"stages": {"zoom_out": {"epochs": 1, "snapshot_epochs": [1]}}})
    assert "stages.zoom_in.epochs (was 3, now 4) [only the last trained stage can be extended" in refused(
        {"stages": {"zoom_in": {"epochs": 4}}})
    assert "stages.zoom_out (removed; it has trained 2 epochs)" in refused({"stages": [MICRO["stages"][0]]})
    with pytest.raises(ValueError, match=r"preset \(was quick, now paper\)"):
        train(root, splits, run, preset="paper", device="cpu", progress=False, resume=True)
    assert {name: (run / name).read_bytes() for name in files} == before

"""SAM-deform training on a real OpenKBP pair: the loss goes down, resuming is exact, and bad
input is refused before any work."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import SimpleITK as sitk
import torch
from conftest import require_data

from SAMERegistrationLib.cli import main
from SAMERegistrationLib.deform_net.checkpoint import load_deform_weights
from SAMERegistrationLib.errors import CheckpointError, ConfigError, InputError, OutputError
from SAMERegistrationLib.features import resolve_features as registration_features
from SAMERegistrationLib.features.sam import default_weights
from SAMERegistrationLib.synthetic import make_phantom
from SAMERegistrationLib.train.checkpoints import list_checkpoints
from SAMERegistrationLib.train.deform_cache import PairCache
from SAMERegistrationLib.train.deform_trainer import (
    DeformTrainConfig,
    crop_pair,
    deform_loss,
    draw_pairs,
    load_training_checkpoint,
    new_training_state,
    resolve_features,
    train_deform,
    train_step,
)

# MIND features on a 4 mm grid and 32x48x48-voxel boxes: a step takes about a second on a CPU.
SMALL = DeformTrainConfig(
    epochs=4,
    pairs=1,
    features="mind",
    working_spacing_mm=4.0,
    lr=1e-3,
    device="cpu",
    checkpoint_every=2,
    patch=(32, 48, 48),
    prealign={"matching.grid_stride": 4},
)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def scans() -> list[Path]:
    folder = require_data("openkbp")
    # With seed 0 the single drawn pair is train_pt_10 (fixed) <- train_pt_1 (moving).
    return [folder / "train_pt_10_ct.nii.gz", folder / "train_pt_1_ct.nii.gz"]


def test_features_resolve_as_registration_resolves_them() -> None:
    # The shipped SAM model is not preferred for "auto" (its record says so): both mean MIND, so
    # a default train-deform trains weights that a default registration uses.
    auto = resolve_features(replace(SMALL, features="auto", sam_weights=None))
    assert auto.features == registration_features("auto", None)[0] == "mind"
    assert auto.sam_weights is None
    if default_weights() is not None:  # "sam" without weights: the shipped model, in both
        sam = resolve_features(replace(SMALL, features="sam", sam_weights=None))
        assert registration_features("sam", None) == ("sam", default_weights())
        assert sam.features == "sam" and sam.sam_weights == str(default_weights().resolve())


def test_pairs_are_ordered_distinct_and_seeded(scans) -> None:
    many = [Path(f"scan_{i}.nii.gz") for i in range(5)]
    pairs = draw_pairs(many, 20, seed=3)
    assert len(set(pairs)) == 20 and all(f != m for f, m in pairs)
    assert pairs == draw_pairs(many, 20, seed=3) and pairs != draw_pairs(many, 20, seed=4)
    assert draw_pairs(many, 7, seed=3) == pairs[:7]
    assert len(draw_pairs(many, 100, seed=3)) == 20  # all ordered pairs, no more


def test_training_steps_lower_the_loss(scans, tmp_path) -> None:
    config = resolve_features(SMALL)
    registration = config.registration_config().resolved_for("mind")
    cache = PairCache(tmp_path, registration, None, True, torch.device("cpu"))
    pairs = draw_pairs(scans, 1, config.seed)
    assert cache.prepare(pairs) == [0]
    whole = cache.load(0, pairs[0], correlation=True)
    assert whole.inputs.correlation.shape[1] == 27
    pair = crop_pair(whole, [20, 14, 46], config.patch)  # a box through the neck
    config = replace(config, lr=5e-4)  # small steps: the loss falls steadily on one box
    state = new_training_state(config, torch.device("cpu"))

    def loss_now() -> float:
        with torch.no_grad():
            output = state.model(pair.inputs.moving, pair.inputs.fixed, pair.inputs.correlation)
            return deform_loss(output, pair, config).total.item()

    before = loss_now()
    for _ in range(8):
        terms = train_step(state, pair, config)
    assert terms.parts["sam"].item() > 0 and terms.parts["similarity"].item() > 0
    assert loss_now() < before - 0.01


def test_resume_continues_exactly(scans, tmp_path) -> None:
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    final = train_deform(scans, straight, SMALL)
    assert [i for i, _ in list_checkpoints(straight)] == [2, 4]
    train_deform(scans, interrupted, replace(SMALL, epochs=2))
    train_deform(scans, interrupted, SMALL, resume=True)

    a = load_training_checkpoint(straight / "checkpoint_0000004.pt")
    b = load_training_checkpoint(interrupted / "checkpoint_0000004.pt")
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    state_a, state_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(state_a[key][name], state_b[key][name]), (key, name)
    log_a = (straight / "train_log.tsv").read_text().splitlines()
    log_b = (interrupted / "train_log.tsv").read_text().splitlines()
    assert [line.split("\t")[:6] for line in log_a] == [line.split("\t")[:6] for line in log_b]
    assert len(log_a) == 5

    model = load_deform_weights(final)  # the final weights load for registration
    assert model.variant == "svf" and model.correlation and model.features == "mind"
    assert model.meta["iterations"] == 4 and model.working_spacing_mm == 4.0
    with pytest.raises(ConfigError, match="lr: 0.001 -> 0.01"):
        train_deform(scans, interrupted, replace(SMALL, lr=0.01), resume=True)
    with pytest.raises(OutputError, match="--resume"):
        train_deform(scans, interrupted, SMALL)


# --- bad input -----------------------------------------------------------------------------------


def test_bad_scans_are_refused_before_any_work(tmp_path) -> None:
    image, labels = make_phantom(size_xyz=(40, 36, 24), spacing=4.0)
    paths = [tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"]
    for path in paths:
        sitk.WriteImage(image, str(path))
    (tmp_path / "notes.txt").write_text("not an image")
    sitk.WriteImage(labels, str(tmp_path / "labels.nii.gz"))
    out = tmp_path / "out"
    with pytest.raises(InputError, match="notes.txt"):
        train_deform([*paths, tmp_path / "notes.txt"], out, SMALL)
    with pytest.raises(InputError, match=r"label maps.*labels\.nii\.gz"):
        train_deform([*paths, tmp_path / "labels.nii.gz"], out, SMALL)
    with pytest.raises(InputError, match="at least 2 scans"):
        train_deform(paths[:1], out, SMALL)
    with pytest.raises(ConfigError, match="variant"):
        train_deform(paths, out, replace(SMALL, variant="bspline"))
    with pytest.raises(ConfigError, match="coarse.iteration"):
        train_deform(paths, out, replace(SMALL, prealign={"coarse.iteration": 5}))
    assert not out.exists()


def test_corrupt_checkpoint_is_refused(scans, tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint_0000002.pt").write_bytes(b"\x80\x02 this is not a checkpoint")
    with pytest.raises(CheckpointError, match="checkpoint_0000002.pt.*corrupt"):
        train_deform(scans, out, SMALL, resume=True)


def test_command_line_trains_and_reports_errors(scans, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    common = ["-o", str(out), "--features", "mind", "--spacing", "4", "--device", "cpu"]
    common += ["--pairs", "1", "--epochs", "1", "--patch", "32", "48", "48", "--variant", "dvf"]
    common += ["--no-correlation", "--set", "matching.grid_stride=4", "--progress", "none"]
    assert main(["train-deform", str(scans[0]), *common]) == 2
    assert capsys.readouterr().err.startswith("error: Training needs at least 2 scans")

    assert main(["train-deform", *map(str, scans), *common]) == 0
    final = Path(capsys.readouterr().out.strip().split(": ", 1)[1])
    assert final == out / "deform_trained.pth"
    model = load_deform_weights(final)
    assert model.variant == "dvf" and not model.correlation

    shutil.copy(out / "checkpoint_0000001.pt", out / "checkpoint_0000002.pt")
    with open(out / "checkpoint_0000002.pt", "r+b") as damaged:
        damaged.truncate(1000)
    assert main(["train-deform", *map(str, scans), *common, "--resume"]) == 2
    assert "checkpoint_0000002.pt" in capsys.readouterr().err

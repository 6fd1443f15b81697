"""Fast inference: streamed vs in-memory sliding window, ensembles, thresholds, postprocessing
selection, uncertainty, batch prediction that resumes after a kill."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers.inference import make_model_dir, write_cases

from medseg.cli.main import main
from medseg.errors import MedsegError
from medseg.inference import batch as batch_module
from medseg.inference.batch import predict_to_folder
from medseg.inference.postprocess import (
    PostprocessConfig,
    apply_postprocessing,
    read_postprocessing,
    threshold_probabilities,
    tune_threshold,
)
from medseg.inference.postprocess_selection import choose_postprocessing
from medseg.inference.predictor import Predictor, restore_geometry
from medseg.io import Image, read_image, write_image
from medseg.models.sliding_window import sliding_window_labels, sliding_window_logits
from medseg.preprocessing.preprocess import CaseGeometry


class TwoLayer(torch.nn.Module):
    """A small non-linear network with a receptive field > 1 (tiles really differ)."""

    def __init__(self, ndim: int, classes: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        conv = torch.nn.Conv3d if ndim == 3 else torch.nn.Conv2d
        self.a, self.b = conv(1, 4, 3, padding=1), conv(4, classes, 3, padding=1)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize("ndim", [2, 3])
def test_streamed_labels_equal_in_memory_argmax(ndim):
    models = [TwoLayer(ndim, 4, 0), TwoLayer(ndim, 4, 1)]  # an ensemble in one tile loop
    shape = (37, 29, 23)[:ndim] if ndim == 3 else (45, 11)  # 11 < patch: padding path
    data = torch.randn(1, *shape)
    options = dict(patch_size=(16,) * ndim, num_classes=4, mirror_axes=(0,), tile_batch_size=3)
    logits = sliding_window_logits(models, data, **options)
    labels, entropy = sliding_window_labels(models, data, **options, entropy=True)
    assert labels.shape == shape and labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, logits.argmax(0).numpy())
    p = torch.softmax(logits, 0)
    expected = -(p * torch.log(p.clamp_min(1e-12))).sum(0).numpy()
    np.testing.assert_allclose(entropy, expected, atol=1e-5)


def test_ensemble_in_one_tile_loop_is_the_mean_of_member_logits():
    a, b = TwoLayer(3, 3, 0), TwoLayer(3, 3, 1)
    data = torch.randn(1, 30, 20, 18)
    kw = dict(patch_size=(16, 16, 16), num_classes=3, mirror_axes=(1, 2))
    both = sliding_window_logits([a, b], data, **kw)
    mean = (sliding_window_logits(a, data, **kw) + sliding_window_logits(b, data, **kw)) / 2
    assert torch.allclose(both, mean, atol=1e-5)


def test_half_and_memmap_buffers(tmp_path):
    model = TwoLayer(3, 3, 0)
    data = torch.randn(1, 30, 20, 18)
    kw = dict(patch_size=(16, 16, 16), num_classes=3)
    full = sliding_window_logits(model, data, **kw)
    mm = sliding_window_logits(model, data, **kw, memmap_path=str(tmp_path / "acc.npy"))
    half = sliding_window_logits(model, data, **kw, buffer_dtype=torch.float16)
    assert torch.equal(full, mm)
    assert half.dtype == torch.float16
    assert torch.allclose(half.float(), full, atol=2e-2)


def _geometry(shape):
    return CaseGeometry(shape, (1.0,) * 3, (0.0,) * 3, (), tuple((0, n) for n in shape), shape)


def test_restore_geometry_thresholds():
    rng = np.random.default_rng(0)
    p1 = rng.uniform(size=(6, 7, 8)).astype(np.float32)
    probs = torch.from_numpy(np.stack([1 - p1, p1]))
    geometry = _geometry((6, 7, 8))
    np.testing.assert_array_equal(restore_geometry(probs, geometry), (p1 > 0.5).astype(np.uint8))
    # a binary threshold is exactly "probability >= t"
    thresholded = restore_geometry(probs, geometry, thresholds={1: 0.3})
    np.testing.assert_array_equal(thresholded, (p1 >= 0.3).astype(np.uint8))


def test_restore_geometry_resamples_class_by_class_like_the_argmax():
    rng = np.random.default_rng(0)
    probs = torch.softmax(torch.from_numpy(rng.normal(size=(5, 4, 5, 6)).astype(np.float32)), 0)
    geometry = CaseGeometry(
        (10, 12, 14), (1.0,) * 3, (0.0,) * 3, (), ((1, 9), (0, 10), (2, 14)), (4, 5, 6)
    )
    label = restore_geometry(probs, geometry)
    up = torch.nn.functional.interpolate(probs[None], size=(8, 10, 12), mode="trilinear")[0]
    expected = np.zeros((10, 12, 14), np.uint8)
    expected[1:9, 0:10, 2:14] = up.argmax(0).numpy()
    assert (label == expected).mean() > 0.999


def _blob(shape, centre, radius):
    grid = np.indices(shape)
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2


def test_choose_postprocessing_keeps_only_what_raises_dice():
    shape = (30, 30, 30)
    refs, labels = [], []
    for shift in (0, 2, 4):
        ref = _blob(shape, (12 + shift, 14, 15), 6).astype(np.uint8)
        pred = ref.copy()
        pred[25:28, 2:5, 2:5] = 1  # a spurious island far away
        pred[12 + shift, 14, 15] = 0  # a one-voxel hole inside
        refs.append(ref)
        labels.append(pred)
    config = choose_postprocessing(refs, num_classes=2, labels=labels)
    assert config.largest_component == (1,)
    assert config.fill_holes == (1,)
    fixed = apply_postprocessing(labels[0], config)
    np.testing.assert_array_equal(fixed, refs[0])
    assert config.selection["dice_after"]["1"] == pytest.approx(1.0)


def test_choose_postprocessing_tunes_a_threshold_from_probabilities():
    shape = (12, 12, 12)
    refs, probs = [], []
    rng = np.random.default_rng(0)
    for _ in range(3):
        ref = _blob(shape, (6, 6, 6), 4)
        p1 = np.where(ref, 0.35, 0.05) + rng.uniform(0, 0.05, shape)  # under-confident network
        refs.append(ref.astype(np.uint8))
        probs.append(np.stack([1 - p1, p1]).astype(np.float32))
    config = choose_postprocessing(refs, num_classes=2, probabilities=probs)
    assert 0.1 <= config.thresholds[1] <= 0.35


def test_predictor_applies_recorded_postprocessing_and_writes_uncertainty(tmp_path):
    model_dir = make_model_dir(tmp_path)
    inputs = write_cases(tmp_path / "in", 1)
    config = PostprocessConfig(largest_component=(1, 2))
    (model_dir / "postprocessing.json").write_text(json.dumps(config.to_json()))
    assert read_postprocessing(model_dir) == config
    predict_to_folder(
        model_dir, inputs, tmp_path / "out", device="cpu", uncertainty=True, show_progress=False
    )
    label = read_image(tmp_path / "out" / "case_00.nii.gz")
    entropy = read_image(tmp_path / "out" / "case_00_entropy.nii.gz")
    raw = Predictor(model_dir, device="cpu").predict(
        [read_image(inputs / "case_00.nii.gz")], postprocess=False
    )
    from medseg.imaging import keep_largest_components

    np.testing.assert_array_equal(label.array, keep_largest_components(raw.array, k=1))
    assert entropy.shape == label.shape and entropy.origin == label.origin
    assert entropy.array.min() >= 0 and entropy.array.max() <= np.log(3) + 1e-5


def test_anisotropic_input_is_resampled_back_with_streaming_off(tmp_path):
    model_dir = make_model_dir(tmp_path)
    inputs = write_cases(tmp_path / "in", 1, shape=(12, 20, 9), spacing=(2.0, 1.0, 1.5))
    predictor = Predictor(model_dir, device="cpu")
    image = read_image(inputs / "case_00.nii.gz")
    label, entropy = predictor.predict_case([image], uncertainty=True, mirror_axes=(0, 1))
    assert label.shape == image.shape and label.spacing == image.spacing
    assert entropy is not None and entropy.shape == image.shape


def test_killed_batch_prediction_resumes_without_redoing_cases(tmp_path, monkeypatch):
    model_dir = make_model_dir(tmp_path)
    inputs = write_cases(tmp_path / "in", 5, shape=(16, 16, 16))
    out = tmp_path / "out"
    real_write = batch_module.write_case
    written: list[str] = []

    def dying_write(label, entropy, path, *, overwrite):
        if len(written) == 3:  # the process dies half way through writing the 4th case
            (path.parent / ".tmp-abc.nii.gz").write_bytes(b"\x1f\x8b half a file")
            raise KeyboardInterrupt
        written.append(path.name)
        real_write(label, entropy, path, overwrite=overwrite)

    monkeypatch.setattr(batch_module, "write_case", dying_write)
    with pytest.raises(KeyboardInterrupt):
        predict_to_folder(model_dir, inputs, out, device="cpu", num_workers=2, show_progress=False)
    finished = sorted(p.name for p in out.glob("case_*.nii.gz"))
    assert finished == written == ["case_00.nii.gz", "case_01.nii.gz", "case_02.nii.gz"]
    mtimes = {name: (out / name).stat().st_mtime_ns for name in finished}
    for name in finished:  # every file there is complete
        assert read_image(out / name).shape == (16, 16, 16)

    monkeypatch.setattr(batch_module, "write_case", real_write)
    results = predict_to_folder(model_dir, inputs, out, device="cpu", show_progress=False)
    assert [r.case_id for r in results] == ["case_03", "case_04"]  # only the unfinished ones
    assert {n: (out / n).stat().st_mtime_ns for n in finished} == mtimes
    assert not list(out.glob(".tmp-*"))
    assert len(json.loads((out / "predictions.json").read_text())) == 2


def test_unknown_backend_and_missing_export_are_user_errors(tmp_path):
    model_dir = make_model_dir(tmp_path)
    with pytest.raises(MedsegError, match="unknown backend"):
        Predictor(model_dir, backend="tensorrt")
    with pytest.raises(MedsegError, match="run `medseg export` first"):
        Predictor(model_dir, backend="onnx")


def test_select_postprocessing_on_validation_folds_records_it(tmp_path):
    model_dir = make_model_dir(tmp_path, num_classes=2)
    images = write_cases(tmp_path / "images", 3, shape=(16, 16, 16))
    cases = []
    for i in range(3):
        label = Image(_blob((16, 16, 16), (8, 8, 8), 4).astype(np.uint8), (1.0, 1.0, 1.0))
        write_image(label, tmp_path / "labels" / f"case_{i:02d}.nii.gz")
        cases.append(
            {
                "case_id": f"case_{i:02d}",
                "images": [str(images / f"case_{i:02d}.nii.gz")],
                "label": str(tmp_path / "labels" / f"case_{i:02d}.nii.gz"),
            }
        )
    spec = {
        "root": str(tmp_path),
        "name": "tiny",
        "layout": "msd",
        "channel_names": ["MRI"],
        "labels": [[0, "background"], [1, "blob"]],
        "cases": cases,
    }
    (model_dir / "dataset.json").write_text(json.dumps(spec))
    split = [{"train": ["case_00"], "val": ["case_01", "case_02"]}]
    (model_dir / "splits.json").write_text(json.dumps(split))
    assert main(["--quiet", "postprocess", str(model_dir), "--tta"]) == 0
    config = read_postprocessing(model_dir)
    assert config is not None and config.selection["cases"] == 2
    for trial in config.selection["trials"]:  # kept exactly when Dice went up
        assert trial["accepted"] == (trial["dice_after"] > trial["dice_before"] + 1e-4)
    assert main(["--quiet", "postprocess", str(model_dir)]) == 2  # refuses to overwrite


def test_bf16_autocast_on_cpu_stays_close_to_fp32():
    model = TwoLayer(3, 3, 0)
    data = torch.randn(1, 24, 20, 18)
    kw = dict(patch_size=(16, 16, 16), num_classes=3)
    fp32 = sliding_window_logits(model, data, **kw)
    bf16 = sliding_window_logits(model, data, **kw, cpu_bf16=True)
    assert bf16.dtype == torch.float32  # accumulated in float32 whatever the network ran in
    assert (fp32 - bf16).abs().max() < 0.05
    assert (fp32.argmax(0) == bf16.argmax(0)).float().mean() > 0.97


def test_collect_inputs_names_an_empty_or_missing_folder(tmp_path):
    from medseg.errors import MedsegError
    from medseg.inference.batch import collect_inputs

    with pytest.raises(MedsegError, match="empty folder"):
        collect_inputs(tmp_path)
    with pytest.raises(MedsegError, match="not found"):
        collect_inputs(tmp_path / "missing")


def test_tune_threshold_finds_the_separating_value():
    rng = np.random.default_rng(0)
    refs = [rng.random((20, 20)) > 0.5 for _ in range(3)]
    probs = [
        np.where(r, rng.uniform(0.62, 1.0, r.shape), rng.uniform(0, 0.58, r.shape)) for r in refs
    ]
    best, scores = tune_threshold(probs, refs, thresholds=np.arange(1, 20) / 20)
    assert best == 0.6 and scores[0.6] == 1.0 and scores[0.5] < 1.0
    np.testing.assert_array_equal(threshold_probabilities(probs[0], best), refs[0])
    with pytest.raises(MedsegError, match="shape"):
        tune_threshold([np.zeros((2, 2))], [np.zeros((3, 3))])

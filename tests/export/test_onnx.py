"""Export: ONNX (dynamic axes) and TorchScript agree with PyTorch, int8 quantization, the
onnxruntime backend of the predictor, and clear refusals."""

from __future__ import annotations

import json

import onnx
import pytest
from helpers.inference import make_model_dir, write_cases
from onnx import TensorProto, helper

from medseg.cli.main import main
from medseg.errors import MedsegError
from medseg.export import export_model, quantize_onnx
from medseg.inference.predictor import Predictor
from medseg.io import read_image


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    model_dir = make_model_dir(root)
    report = export_model(model_dir, int8=("dynamic",))
    return model_dir, report


def test_onnx_matches_pytorch_on_dynamic_shapes(exported):
    model_dir, report = exported
    check = report.checks["fold_0"]
    shapes = [c["input_shape"] for c in check["inputs"]]
    assert shapes[0] == [1, 1, 16, 16, 16] and shapes[1] == [2, 1, 18, 18, 18]  # dynamic axes
    assert check["max_abs_logit_diff"] < 1e-3
    assert check["argmax_agreement"] >= 0.999
    saved = json.loads((model_dir / "export" / "export.json").read_text())
    assert saved["files"]["fold_0"].endswith("fold_0.onnx")


def test_dynamic_int8_is_quantized_and_close(exported):
    model_dir, report = exported
    graph = onnx.load(report.files["fold_0_int8_dynamic"]).graph
    assert any(n.op_type in ("ConvInteger", "DynamicQuantizeLinear") for n in graph.node)
    assert report.checks["fold_0_int8_dynamic"]["argmax_agreement"] > 0.9


def test_onnx_backend_predicts_like_pytorch(exported, tmp_path):
    model_dir, _ = exported
    image = read_image(write_cases(tmp_path / "in", 1, shape=(21, 19, 18)) / "case_00.nii.gz")
    torch_label = Predictor(model_dir, device="cpu", precision="fp32").predict(
        [image], mirror_axes=(0,)
    )
    onnx_label = Predictor(model_dir, backend="onnx").predict([image], mirror_axes=(0,))
    assert (torch_label.array == onnx_label.array).mean() >= 0.999
    int8 = Predictor(model_dir, backend="onnx-int8").predict([image])
    assert int8.shape == image.shape


def test_cli_predict_with_onnx_backend(exported, tmp_path):
    model_dir, _ = exported
    inputs = write_cases(tmp_path / "in", 2)
    out = tmp_path / "out"
    assert (
        main(
            [
                "--quiet",
                "predict",
                str(model_dir),
                str(inputs),
                "-o",
                str(out),
                "--backend",
                "onnx",
                "--tta-axes",
                "0,1",
                "--uncertainty",
            ]
        )
        == 0
    )
    assert (out / "case_01.nii.gz").exists() and (out / "case_01_entropy.nii.gz").exists()


def test_torchscript_export_matches(tmp_path):
    model_dir = make_model_dir(tmp_path)
    report = export_model(model_dir, fmt="torchscript")
    assert report.checks["fold_0"]["max_abs_logit_diff"] < 1e-4
    with pytest.raises(MedsegError, match="already exists"):
        export_model(model_dir, fmt="torchscript")


def test_int8_rejects_what_it_cannot_quantize(tmp_path, capsys):
    # a graph with no Conv/MatMul/Gemm: nothing has int8 weights
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    with pytest.raises(MedsegError, match="relu.onnx: cannot quantize to int8: the graph has no"):
        quantize_onnx(path, tmp_path / "q.onnx")
    assert not (tmp_path / "q.onnx").exists()
    # static int8 without any training data to calibrate on
    model_dir = make_model_dir(tmp_path / "m")
    with pytest.raises(MedsegError, match="needs calibration patches"):
        export_model(model_dir, int8=("static",))
    # TorchScript cannot carry onnxruntime int8: one line, exit code 2
    assert main(["export", str(model_dir), "--format", "torchscript", "--int8"]) == 2
    assert "int8 quantization needs --format onnx" in capsys.readouterr().err

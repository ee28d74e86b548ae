"""Where calibration, healing and validation run: the CPU here, a GPU whenever there is one."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

import normswap
from models import build, input_for
from normswap.calibration.device import device_of, resolve_device

GPU = torch.cuda.is_available()


def test_auto_and_cpu_resolve_to_this_machine(monkeypatch) -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("LOCAL_RANK", "0")  # under torchrun: this rank's local GPU, when there is one
    assert resolve_device("auto") == (torch.device("cuda", 0) if GPU else torch.device("cpu"))
    with pytest.raises(ValueError, match="device must be one of"):
        resolve_device("tpu:nine")


@pytest.mark.skipif(GPU, reason="this machine has a GPU: asking for one is valid here")
def test_asking_for_a_gpu_without_one_is_refused_with_a_sentence(tmp_path, monkeypatch) -> None:
    with pytest.raises(ValueError, match="no GPU on this machine"):
        resolve_device("cuda")
    from normswap.cli import main

    monkeypatch.chdir(tmp_path)
    torch.save(build("resnet").state_dict(), tmp_path / "ckpt.pt")
    torch.save(input_for("resnet", batch=16), tmp_path / "calib.pt")
    spec = f"{__import__('pathlib').Path(__file__).parent / 'models.py'}:ResNetStyle"
    result = CliRunner().invoke(
        main,
        [
            "convert",
            "ckpt.pt",
            "--model",
            spec,
            "--input-shape",
            "4,3,12,12",
            "--out",
            "out",
            "--calibration-data",
            "calib.pt",
            "--device",
            "cuda",
        ],
    )
    assert result.exit_code == 2 and "--device cuda" in result.output and "no GPU" in result.output
    assert not (tmp_path / "out").exists()


def test_calibration_on_the_cpu_leaves_the_models_where_they_were() -> None:
    model = build("resnet")
    data = [input_for("resnet", batch=16) * (1 + i / 4) for i in range(4)]
    conversion = normswap.convert(
        model, input_for("resnet"), calibration_data=data, heal=normswap.HealOptions(steps=10), device="cpu"
    )
    assert device_of(conversion.model) == device_of(model) == torch.device("cpu")
    assert conversion.healing is not None and conversion.healing.steps == 10


@pytest.mark.skipif(not GPU, reason="no CUDA GPU on this machine: the GPU path runs wherever there is one")
def test_calibration_and_validation_on_the_gpu(tmp_path) -> None:
    model = build("resnet")
    data = [input_for("resnet", batch=16) * (1 + i / 4) for i in range(4)]
    on_cpu = normswap.convert(model, input_for("resnet"), calibration_data=data, device="cpu")
    on_gpu = normswap.convert(model, input_for("resnet"), calibration_data=data, device="cuda")
    assert device_of(on_gpu.model).type == "cpu"  # back where it came from
    for a, b in zip(on_cpu.calibration, on_gpu.calibration, strict=True):
        assert a.r2 == pytest.approx(b.r2, abs=1e-3)  # the same fit, up to GPU arithmetic
    path = normswap.export_onnx(on_gpu.model, input_for("resnet"), tmp_path / "m.onnx")
    assert normswap.validate_onnx(on_gpu.model, path, input_for("resnet"), plan=on_gpu.plan, device="cuda").passed

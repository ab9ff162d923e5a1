"""Int8 export of a quantized HTDemucs (the network between STFT and iSTFT) and running it: Demucs'
``apply_model`` on :class:`OrtHTDemucs`, ``fqss export`` / ``fqss separate`` on a Demucs package."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch
from demucs.apply import apply_model

import fqss_plugin as fq
from fqss_plugin.demucs import OrtHTDemucs, prepare_model, save_quantized_model
from fqss_plugin.export import ort_op_report, to_onnx
from fqss_plugin.export.view import WaveformSeparator
from tests.test_int8_portable import needs_qemu
from tests.test_demucs_adapter import FREQUENCY_BRANCH, SOURCES, music, tiny_htdemucs


def snr(estimate, reference) -> float:
    estimate, reference = np.asarray(estimate), np.asarray(reference)
    return float(10 * np.log10((reference ** 2).sum() / ((reference - estimate) ** 2).sum()))


@pytest.fixture(scope="module")
def calibrated():
    from tests.conftest import single_thread
    with single_thread():
        # two transformer layers: a self-attention and a cross-attention one (its q and k/v weights are Slices)
        return calibrate(prepare_model(tiny_htdemucs(t_layers=2), fq.QuantConfig.fqss(
            calib_steps=2, layer_act_splits=FREQUENCY_BRANCH)))


def calibrate(model):
    model.train()
    for seed in range(3):
        model(music(seed=seed))
        fq.calibration_step(model)
    return model.eval()


@pytest.fixture(scope="module")
def exported(calibrated, tmp_path_factory):
    return to_onnx(calibrated, tmp_path_factory.mktemp("onnx") / "htdemucs.onnx")       # dispatched to Demucs' exporter


def test_the_network_runs_in_integer_and_matches_torch(calibrated, exported, one_thread):
    assert exported.n_src == 4 and exported.sample_rate == 8000
    report = ort_op_report(exported.path)
    # every convolution in integer: fused QLinearConv, or one ConvInteger per 8-bit part of a split tensor
    # (the decoders' transposed convolutions as polyphase convolutions); the transformer's linear layers
    # (weight + bias) as MatMulInteger
    assert report.integer["ConvInteger"] >= 20 and report.integer["QLinearConv"] >= 8
    assert report.integer["MatMulInteger"] >= 6
    assert not {"Conv", "FusedConv", "ConvTranspose", "Gemm", "MatMul", "FusedMatMul"} & set(report.float_compute)
    assert report.integer["QLinearMatMul"] >= 2 and report.integer["QLinearAdd"] >= 10    # attention; sums
    runtime = OrtHTDemucs(exported.path)
    mix = music(seed=7)
    frozen = WaveformSeparator.frozen(calibrated).model
    with torch.no_grad():
        _, _, spec, wave, _, _ = frozen.analyse(mix)
        reference = frozen.network(spec, wave)
    outputs = runtime.session.run(None, {"spec": spec.numpy(), "wave": wave.numpy()})
    for out, ref in zip(outputs, reference):
        assert snr(out, ref.numpy()) > 25


def test_demucs_apply_model_runs_the_int8_file(calibrated, exported, one_thread):
    runtime = OrtHTDemucs(exported.path)
    assert runtime.sources == SOURCES and runtime.audio_channels == 2
    mix = music(seconds=2.5, seed=3)
    with torch.no_grad():
        reference = apply_model(WaveformSeparator.frozen(calibrated).model, mix, split=True, overlap=0.25, shifts=0)
        estimate = apply_model(runtime, mix, split=True, overlap=0.25, shifts=0)
    assert estimate.shape == reference.shape == (1, 4, 2, mix.shape[-1])
    assert snr(estimate, reference) > 20


def test_cli_exports_a_demucs_package_and_writes_named_stereo_stems(calibrated, tmp_path, capsys):
    from fqss_plugin.cli import main as cli_main

    package = save_quantized_model(calibrated, tmp_path / "exp" / "best.th")
    out = tmp_path / "htdemucs.onnx"
    assert cli_main(["export", "--checkpoint", str(package), "--out", str(out)]) == 2
    assert "--trust-package" in capsys.readouterr().err                    # Demucs' loader unpickles
    assert cli_main(["export", "--checkpoint", str(package), "--out", str(out), "--trust-package"]) == 0
    song = music(seconds=1.5, seed=4)[0].numpy().T
    sf.write(tmp_path / "song.wav", song, 8000, subtype="FLOAT")
    assert cli_main(["separate", "--model", str(out), str(tmp_path / "song.wav"), "--out-dir", str(tmp_path / "st")]) == 0
    stems = {s: sf.read(tmp_path / "st" / f"song_{s}.wav", dtype="float32") for s in SOURCES}
    assert all(rate == 8000 and stem.shape == song.shape for stem, rate in stems.values())
    total = sum(stem for stem, _ in stems.values())
    assert np.isfinite(total).all() and np.abs(total).max() > 0



@pytest.fixture(scope="module")
def w8_files(tmp_path_factory):
    """A split HTDemucs with full 8-bit weight codes, exported portable (the default) and for VNNI CPUs only."""
    from tests.conftest import single_thread
    with single_thread():
        model = calibrate(prepare_model(tiny_htdemucs(seed=2), fq.QuantConfig.fqss(
            weight_bits=8, calib_steps=2, layer_act_splits=FREQUENCY_BRANCH)))
        folder = tmp_path_factory.mktemp("w8")
        paths = {target: to_onnx(model, folder / f"{target}.onnx", target=target).path
                 for target in ("portable", "vnni")}
        frozen = WaveformSeparator.frozen(model).model
        with torch.no_grad():
            _, _, spec, wave, _, _ = frozen.analyse(music(seed=8))
            reference = [r.numpy() for r in frozen.network(spec, wave)]
    return paths, (spec.numpy(), wave.numpy()), reference


def test_integer_convolutions_of_8_bit_weight_codes_are_exact_on_every_cpu(w8_files, one_thread):
    """Full 8-bit weight codes can saturate a u8 x s8 pair on CPUs without VNNI: the portable file stores the
    ConvInteger and MatMulInteger weights as uint8 (zero point 128), the same values, and still matches torch."""
    import onnx

    from fqss_plugin.export.saturation import saturation_risks

    paths, (spec, wave), reference = w8_files
    model = onnx.load(str(paths["portable"]))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    integer_ops = [n for n in model.graph.node if n.op_type in ("ConvInteger", "MatMulInteger")]
    assert saturation_risks(model) == [] and saturation_risks(onnx.load(str(paths["vnni"])))
    weights = {n.op_type: [] for n in integer_ops}
    for n in integer_ops:
        weights[n.op_type].append(inits[n.input[1]])
    assert set(weights) == {"ConvInteger", "MatMulInteger"}
    assert all(any(w.dtype == np.uint8 for w in ws) for ws in weights.values())
    assert all(w.dtype in (np.uint8, np.int8) for ws in weights.values() for w in ws)
    assert all(int(inits[n.input[3]]) == 128 for n in integer_ops if inits[n.input[1]].dtype == np.uint8)
    outputs = OrtHTDemucs(paths["portable"]).session.run(None, {"spec": spec, "wave": wave})
    for out, ref in zip(outputs, reference):
        assert snr(out, ref) > 25


@needs_qemu
def test_the_portable_file_is_right_on_an_emulated_cpu_without_vnni(w8_files, one_thread):
    """onnxruntime's own kernels of an AVX2 CPU without VNNI (QEMU) run the portable file's ConvInteger (uint8
    weights, zero point 128) and QLinearConv as they do on this CPU."""
    from fqss_plugin.export.emulate import run_emulated

    paths, inputs, reference = w8_files
    spec, wave = run_emulated(paths["portable"], [inputs])[0]
    assert snr(spec, reference[0]) > 25 and snr(wave, reference[1]) > 25

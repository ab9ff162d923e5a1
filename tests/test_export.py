"""Int8 ONNX export: round trip on a small *trained* ConvTasNet, parity, any length, clear errors, CLI."""
import copy

import numpy as np
import onnx
import pytest
import soundfile as sf
import torch
from asteroid.models import ConvTasNet

import fqss_plugin as fq
from fqss_plugin.asteroid import prepare_model, save_quantized_model
from fqss_plugin.cli import main as cli_main
from fqss_plugin.export import ExportError, OrtSeparator, ort_op_report, parity_report, to_onnx
from fqss_plugin.loss import FQSSLoss
from tests.conftest import single_thread

SR = 8000
pytestmark = pytest.mark.usefixtures("one_thread")     # tests/conftest.py: steadier on a shared CPU


def two_source_batch(batch: int, length: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A synthetic 2-speaker-like task: a gliding harmonic stack vs bursty high-passed noise."""
    t = torch.arange(length) / SR
    tones, noises = [], []
    for _ in range(batch):
        f0 = 120 + 150 * torch.rand((), generator=gen)
        phase = 2 * torch.pi * torch.cumsum(f0 * (1 + 0.05 * torch.sin(2 * torch.pi * 1.3 * t)), 0) / SR
        tones.append(0.3 * sum(torch.sin(k * phase) / k for k in range(1, 8)))
        noise = torch.randn(length, generator=gen)
        noise = noise - torch.nn.functional.pad(noise, (1, 0))[:-1]          # high-passed
        bursts = (torch.sin(2 * torch.pi * (2 + 3 * torch.rand((), generator=gen)) * t) > 0.3).float()
        noises.append(0.15 * noise * bursts)
    sources = torch.stack([torch.stack(tones), torch.stack(noises)], 1)
    gain = 0.3 + 0.7 * torch.rand(batch, 1, 1, generator=gen)
    sources = sources * gain
    return sources.sum(1), sources


def tiny_convtasnet():
    return ConvTasNet(n_src=2, n_blocks=3, n_repeats=1, bn_chan=16, hid_chan=32, skip_chan=16, n_filters=32,
                      kernel_size=16, stride=8, sample_rate=SR)


def tiny_dptnet(chunk_size: int = 20, hop_size: int = 10):
    from asteroid.models import DPTNet
    return DPTNet(n_src=2, n_filters=16, kernel_size=16, stride=8, n_heads=2, ff_hid=16, chunk_size=chunk_size,
                  hop_size=hop_size, n_repeats=1, sample_rate=SR)


def qat_from(teacher, float_steps: int, qat_steps: int, gen: torch.Generator, prepare=prepare_model):
    """Train ``teacher`` in float for ``float_steps``, then FQSS QAT (5 calibrating) for ``qat_steps`` of a copy
    quantized by ``prepare(model, config)``."""
    loss = FQSSLoss(lambda_kd=0.0)
    optimizer = torch.optim.Adam(teacher.parameters(), lr=3e-3)
    for _ in range(float_steps):
        mix, sources = two_source_batch(4, 4000, gen)
        optimizer.zero_grad()
        loss(teacher(mix), sources).backward()
        optimizer.step()
    teacher.eval()
    model = prepare(copy.deepcopy(teacher), fq.QuantConfig.fqss(calib_steps=5))
    loss = FQSSLoss(lambda_kd=0.1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(qat_steps):
        mix, sources = two_source_batch(4, 4000, gen)
        with torch.no_grad():
            teacher_estimate = teacher(mix)
        optimizer.zero_grad()
        loss(model(mix), sources, teacher_estimate).backward()
        optimizer.step()
        fq.calibration_step(model)
    return teacher, model.eval()


@pytest.fixture(scope="module")
def trained():
    """(float model, FQSS-trained quantized model): 150 float steps, then 40 QAT steps (5 calibrating).

    One thread: on a shared 2-core machine, torch's default 2 threads run this 30x slower."""
    with single_thread():
        return _train()


def _train():
    torch.manual_seed(0)
    return qat_from(tiny_convtasnet(), 150, 40, torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    result = to_onnx(trained[1], path)
    return result


def test_export_is_a_compact_int8_model_that_onnxruntime_runs_in_integer(exported, trained):
    model = onnx.load(str(exported.path))
    onnx.checker.check_model(model)
    ops = {n.op_type for n in model.graph.node}
    assert "PRelu" not in ops and "LeakyRelu" in ops                           # single-slope PReLU rewritten
    assert exported.tensor_bytes["int8"] > exported.tensor_bytes.get("float32", 0)
    weights = [t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT
               and sum(d > 1 for d in t.dims) > 1]
    assert not weights, weights                                                 # no float weight matrix left
    raw = to_onnx(trained[1], exported.path.with_name("raw.onnx"), deploy=False)   # exporter output as is
    assert exported.bytes < 0.5 * raw.bytes and raw.tensor_bytes.get("int8", 0) < 1000
    report = ort_op_report(exported.path)
    assert report.integer["QLinearConv"] >= 12                                  # every masker conv
    assert report.integer["QLinearLeakyRelu"] == 7 and report.integer["QLinearSigmoid"] == 1
    assert report.integer["MatMulIntegerToFloat"] == 2                          # the decoder, per 8-bit input part
    assert report.integer["ConvInteger"] == 2                                   # the encoder, per input part
    assert not {"PRelu", "ConvTranspose", "Conv", "MatMul"} & set(report.float_compute)
    assert exported.tagged_quantizers > 30 and exported.sample_rate == SR and exported.n_src == 2


def test_onnxruntime_reproduces_the_trained_fake_quant_model(exported, trained):
    gen = torch.Generator().manual_seed(123)
    mix, sources = two_source_batch(2, 6000, gen)
    parity = parity_report(trained[1], exported.path, mix)
    assert parity.snr_db >= 40, str(parity)
    # per quantizer, fed the same inputs (torch takes onnxruntime's upstream codes): never more than
    # 1 LSB apart, and 1-LSB flips (requantization rounding, int32 bias) are rare
    assert parity.worst_local_beyond_1lsb == 0, str(parity)
    assert parity.worst_local_differ <= 0.005, str(parity)
    # free-running, those flips propagate (and a 1-LSB input flip is > 1 LSB after a narrower
    # quantizer); still bounded
    assert parity.worst_beyond_1lsb <= 0.15, str(parity)
    assert len(parity.quantizers) == exported.tagged_quantizers
    first = {q.name: q for q in parity.quantizers}
    assert first["encoder.input_splitter.grid_quantizers.0"].differ == 0    # in-graph split is exact
    assert first["encoder.input_splitter.grid_quantizers.1"].differ == 0
    assert first["encoder.input_splitter.grid_quantizers.0"].snr_db == float("inf")
    masker = [q for q in parity.quantizers if q.name.startswith("masker.") and not q.derived]
    assert masker[0].snr_db >= 45 and all(q.snr_db >= 25 for q in masker), str(parity)   # free-running value SNR
    # separation quality identical to the torch model to 0.02 dB SI-SDR
    with torch.no_grad():
        reference = trained[1](mix)
    estimate = torch.from_numpy(OrtSeparator(exported.path).separate(mix.numpy()))
    loss = FQSSLoss(lambda_kd=0.0)
    assert abs(float(loss(estimate, sources) - loss(reference, sources))) <= 0.02


def test_staged_norm_means_stay_accurate_on_long_inputs(exported, trained):
    """The gLN mean and variance span channels and time; onnxruntime's ``ReduceMean`` over both axes at once
    sums every value into one float32 accumulator, so its error grows with the input length and flips codes
    after the norm. Taking the means one axis at a time, on two minutes of audio the norms'
    quantizers still agree with torch as on short inputs (``staged_norm_means``; the default export keeps
    the faster joint mean)."""
    path = exported.path.with_name("staged.onnx")
    to_onnx(trained[1], path, staged_norm_means=True)
    wav = 0.2 * torch.randn(1, 120 * SR, generator=torch.Generator().manual_seed(7))
    parity = parity_report(trained[1], path, wav)
    norms = [q for q in parity.quantizers if ".shared_block.2." in q.name or ".shared_block.5." in q.name]
    assert len(norms) == 6, [q.name for q in parity.quantizers]
    assert max(q.local_differ for q in norms) <= 0.005, str(parity)
    assert parity.worst_local_beyond_1lsb == 0, str(parity)


@pytest.mark.parametrize("length", [16, 17, 24, 1001, 4003])     # >= the encoder kernel (16), stride 8
def test_any_length_and_shape(exported, trained, length):
    separator = OrtSeparator(exported.path, threads=1)
    wav = 0.2 * torch.randn(length, generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        reference = trained[1](wav)
    out = separator.separate(wav)                                  # torch in, torch out, [n_src, time]
    assert isinstance(out, torch.Tensor) and out.shape == reference.shape == (2, length)
    batch = separator.separate(np.stack([wav.numpy(), 0.5 * wav.numpy()]))
    assert isinstance(batch, np.ndarray) and batch.shape == (2, 2, length)
    assert separator.separate(wav[None, None].numpy()).shape == (1, 2, length)
    if length > 1000:
        assert 10 * np.log10(reference.pow(2).sum() / (reference - out).pow(2).sum()) > 35


def test_conv_decoder_variant_and_view_is_exact(trained, tmp_path):
    from fqss_plugin.export import export_view
    mix, _ = two_source_batch(1, 3001, torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference = fq.freeze(copy.deepcopy(trained[1]))(mix)
        assert torch.equal(export_view(trained[1], decoder="conv")(mix), reference)
        matmul = export_view(trained[1], decoder="matmul")(mix)
    assert float((matmul - reference).abs().max()) < 1e-3          # same products, other summation order
    result = to_onnx(trained[1], tmp_path / "conv.onnx", mix, decoder="conv")
    report = ort_op_report(result.path)    # the transposed conv as a polyphase ConvInteger per input part,
    assert not {"ConvTranspose", "Conv"} & set(report.float_compute)    # the encoder's as one per input part
    assert report.integer["ConvInteger"] == 4
    assert parity_report(trained[1], result.path, mix).snr_db >= 40


def test_clear_errors(trained, tmp_path):
    with pytest.raises(ExportError, match="no fqss quantizer"):
        to_onnx(trained[0], tmp_path / "float.onnx")
    fresh = prepare_model(tiny_convtasnet(), fq.QuantConfig.fqss())
    with pytest.raises(ExportError, match="has not run yet|never seen data"):
        to_onnx(fresh, tmp_path / "uncalibrated.onnx")
    with pytest.raises(ExportError, match="decoder must be"):
        to_onnx(trained[1], tmp_path / "x.onnx", decoder="fft")
    with pytest.raises(ExportError, match="4-bit activation quantizer.*8-bit activations only"):
        to_onnx(prepare_model(tiny_convtasnet(), fq.QuantConfig.fqss(act_bits=4)), tmp_path / "4bit.onnx")
    # overlap-add as pads and sums needs chunk = k * hop
    dptnet = prepare_model(tiny_dptnet(chunk_size=20, hop_size=7), fq.QuantConfig.fqss(calib_steps=1))
    with torch.no_grad():
        dptnet.train()(torch.randn(1, 2000))
    with pytest.raises(ExportError, match="multiple of the hop size"):
        to_onnx(dptnet.eval(), tmp_path / "dptnet.onnx")
    with pytest.raises(FileNotFoundError):
        OrtSeparator(tmp_path / "missing.onnx")
    (tmp_path / "garbage.onnx").write_bytes(b"not onnx")
    with pytest.raises(ValueError, match="onnxruntime cannot load it"):
        OrtSeparator(tmp_path / "garbage.onnx")


def test_cli_export_and_separate(trained, tmp_path, capsys):
    package = save_quantized_model(trained[1], tmp_path / "exp" / "best_model.pth", fq.QuantConfig.fqss(calib_steps=5))
    out = tmp_path / "model.onnx"
    assert cli_main(["export", "--checkpoint", str(package.parent), "--out", str(out), "--report"]) == 0
    printed = capsys.readouterr().out
    assert "QLinearConv" in printed and out.is_file()
    staged = tmp_path / "staged.onnx"
    assert cli_main(["export", "--checkpoint", str(package), "--out", str(staged), "--staged-norm-means"]) == 0
    means = {p: sum(n.op_type == "ReduceMean" for n in onnx.load(str(p)).graph.node) for p in (out, staged)}
    assert means[staged] == 2 * means[out] > 0                       # gLN means over time, then channels
    mix, _ = two_source_batch(1, 2345, torch.Generator().manual_seed(9))
    sf.write(tmp_path / "mix.wav", mix[0].numpy(), SR, subtype="FLOAT")
    assert cli_main(["separate", "--model", str(out), str(tmp_path / "mix.wav"), "--out-dir", str(tmp_path / "sep")]) == 0
    estimates = [sf.read(tmp_path / "sep" / f"mix_s{k}.wav")[0] for k in (1, 2)]
    with torch.no_grad():
        reference = trained[1](mix)[0].numpy()
    for k in range(2):
        assert estimates[k].shape == (2345,)
        assert 10 * np.log10((reference[k] ** 2).sum() / ((reference[k] - estimates[k]) ** 2).sum()) > 35
    # a float package and a malformed file: one clear message, exit code 2
    float_package = tmp_path / "float" / "best_model.pth"
    float_package.parent.mkdir()
    torch.save(trained[0].serialize(), float_package)
    assert cli_main(["export", "--checkpoint", str(float_package), "--out", str(tmp_path / "f.onnx")]) == 2
    assert "not a quantized fqss model" in capsys.readouterr().err
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"garbage")
    assert cli_main(["export", "--checkpoint", str(bad), "--out", str(tmp_path / "b.onnx")]) == 2
    assert "not a readable Asteroid model package" in capsys.readouterr().err
    sf.write(tmp_path / "mix16k.wav", mix[0].numpy(), 16000)
    assert cli_main(["separate", "--model", str(out), str(tmp_path / "mix16k.wav"), "--out-dir", str(tmp_path)]) == 2
    assert "expects 8000 Hz" in capsys.readouterr().err
    # --int4-weights on a model with 7-bit codes: a clear error, neither --out nor the int8 step left behind
    before = set(tmp_path.iterdir())
    assert cli_main(["export", "--checkpoint", str(package), "--out", str(tmp_path / "w4.onnx"), "--int4-weights"]) == 2
    assert "within 4 bits" in capsys.readouterr().err and set(tmp_path.iterdir()) == before


def test_compact_passes_keep_the_graph_and_its_subgraphs(trained, tmp_path):
    """COMPACT (Constant nodes as initializers, merged duplicates, default Conv attributes dropped, shortest names)
    on the float model's raw export, whose Asteroid helpers leave an ``If`` with outer-scope references: same
    outputs to the bit, a valid graph, fewer bytes."""
    import io
    import warnings
    import onnxruntime as ort
    from fqss_plugin.export import passes
    from fqss_plugin.export.view import WaveformSeparator
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(WaveformSeparator(copy.deepcopy(trained[0]).eval()), (torch.randn(1, 4000),), buffer,
                          dynamo=False, opset_version=17, input_names=["mixture"], output_names=["sources"],
                          dynamic_axes={"mixture": {0: "batch", 1: "time"}, "sources": {0: "batch", 2: "time"}})
    raw = onnx.load_from_string(buffer.getvalue())
    assert any(n.op_type == "If" for n in raw.graph.node) and any(n.op_type == "Constant" for n in raw.graph.node)
    compact = copy.deepcopy(raw)
    changes = {p.__name__: p(compact) for p in passes.COMPACT}
    assert all(changes.values()), changes
    onnx.checker.check_model(compact, full_check=True)
    assert compact.ByteSize() < 0.9 * raw.ByteSize()
    assert not any(n.op_type == "Constant" for n in compact.graph.node)
    assert max(len(t.name) for t in compact.graph.initializer) <= 2
    mixture = two_source_batch(2, 5000, torch.Generator().manual_seed(3))[0].numpy()
    outputs = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"mixture": mixture})[0] for m in (raw, compact)]
    np.testing.assert_array_equal(outputs[0], outputs[1])


@pytest.fixture(scope="module")
def trained_dptnet():
    """(float, FQSS-trained) tiny DPTNet: 60 float steps, then 15 QAT steps (one thread)."""
    with single_thread():
        torch.manual_seed(0)
        return qat_from(tiny_dptnet(), 60, 15, torch.Generator().manual_seed(1))


def test_dptnet_exports_its_lstms_as_loops_on_any_length(trained_dptnet, tmp_path):
    """DPTNet: attention, the intra- and inter-chunk BiLSTMs (each direction an ONNX ``Loop`` over time) and the
    dual-path overlap-add; the view is bit-identical to the torch model, onnxruntime reproduces it on lengths
    other than the traced one, and the loop body agrees with torch's time step code for code."""
    from fqss_plugin.export import export_view
    model = trained_dptnet[1]
    result = to_onnx(model, tmp_path / "dptnet.onnx")
    graph = onnx.load(str(result.path))
    assert sum(n.op_type == "Loop" for n in graph.graph.node) == 4       # 2 BiLSTMs x 2 directions
    assert {o.domain for o in graph.opset_import} <= {"", "ai.onnx"}      # no placeholder left
    report = ort_op_report(result.path)
    assert report.integer["QLinearMatMul"] >= 4 and "QLinearSoftmax" not in report.integer   # float softmax: faster
    assert report.float_compute["Softmax"] == 2 and report.float_compute["Loop"] == 4
    integer_softmax = to_onnx(model, tmp_path / "integer_softmax.onnx", integer_softmax=True)
    assert ort_op_report(integer_softmax.path).integer["QLinearSoftmax"] == 2
    mix, sources = two_source_batch(2, 6000, torch.Generator().manual_seed(123))
    with torch.no_grad():
        reference = fq.freeze(copy.deepcopy(model))(mix)
        assert torch.equal(export_view(model)(mix), reference)
    parity = parity_report(model, result.path, mix)
    assert parity.snr_db >= 38, str(parity)
    assert parity.worst_local_beyond_1lsb == 0, str(parity)
    lstm_outputs = [q for q in parity.quantizers if ".recurrent.output_quantizers." in q.name]
    assert len(lstm_outputs) == 2 and max(q.local_differ for q in lstm_outputs) <= 0.002, str(parity)
    estimate = torch.from_numpy(OrtSeparator(result.path).separate(mix.numpy()))
    loss = FQSSLoss(lambda_kd=0.0)
    assert abs(float(loss(estimate, sources) - loss(reference, sources))) <= 0.02
    separator = OrtSeparator(result.path)
    for length in (1001, 2999):                      # other chunk counts than the traced second of audio
        wav = 0.2 * torch.randn(length, generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            expected = model(wav)
        out = separator.separate(wav)
        assert out.shape == expected.shape == (2, length)
        assert 10 * np.log10(expected.pow(2).sum() / (expected - out).pow(2).sum()) > 30


def test_sepformer_package_exports_and_runs_any_length(tmp_path, capsys):
    """SpeechBrain SepFormer (the tests' tiny one, trained briefly): `fqss export` of its inference package
    directory; the view is bit-identical, onnxruntime reproduces the torch model on any length."""
    from fqss_plugin.export import export_view
    from fqss_plugin.speechbrain import SepformerWaveform, prepare_waveform, save_pretrained_separator
    from tests.test_speechbrain_adapter import tiny_modules
    modules = tiny_modules()                                      # one thread: the module's one_thread fixture
    teacher = SepformerWaveform(modules["encoder"], modules["masknet"], modules["decoder"], 2, SR)
    _, model = qat_from(teacher, 30, 10, torch.Generator().manual_seed(2), prepare=prepare_waveform)
    config = fq.QuantConfig.fqss(calib_steps=5)
    package = save_pretrained_separator(tmp_path / "pkg", {"encoder": model.encoder, "masknet": model.masknet,
                                                           "decoder": model.decoder}, config, sample_rate=SR)
    out = tmp_path / "sepformer.onnx"
    assert cli_main(["export", "--checkpoint", str(package), "--out", str(out)]) == 2      # runs its yaml: trust it
    assert "--trust-package" in capsys.readouterr().err and not out.exists()
    assert cli_main(["export", "--checkpoint", str(package), "--out", str(out), "--trust-package"]) == 0
    assert "2 sources at 8000 Hz" in capsys.readouterr().out
    hostile = tmp_path / "hostile"
    hostile.mkdir()
    (hostile / "hyperparams.yaml").write_text(f"pwn: !apply:pathlib.Path.touch [{tmp_path / 'pwned'}]\n")
    assert cli_main(["export", "--checkpoint", str(hostile), "--out", str(tmp_path / "h.onnx")]) == 2
    assert not (tmp_path / "pwned").exists()                # nothing of an untrusted package ran
    mix, sources = two_source_batch(2, 6000, torch.Generator().manual_seed(123))
    with torch.no_grad():
        reference = fq.freeze(copy.deepcopy(model))(mix)
        assert torch.equal(export_view(model)(mix), reference)
    parity = parity_report(model, out, mix)
    assert parity.snr_db >= 35 and parity.worst_local_beyond_1lsb == 0, str(parity)
    estimate = torch.from_numpy(OrtSeparator(out).separate(mix.numpy()))
    loss = FQSSLoss(lambda_kd=0.0)
    assert abs(float(loss(estimate, sources) - loss(reference, sources))) <= 0.02
    separator = OrtSeparator(out)
    for length in (1001, 2999, 3004):            # other chunk counts, and each residue of the stride (8)
        wav = 0.2 * torch.randn(length, generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            expected = model(wav[None])[0]
        got = separator.separate(wav)
        assert got.shape == expected.shape == (2, length)
        assert 10 * np.log10(expected.pow(2).sum() / (expected - got).pow(2).sum()) > 30


def test_unidirectional_multilayer_lstm_exports(tmp_path):
    """Asteroid's LSTMTasNet with a 2-layer unidirectional LSTM (calibrated): one ``Loop`` per layer, the view
    bit-identical, onnxruntime within rounding of torch on lengths other than the traced one."""
    from asteroid.models import LSTMTasNet
    from fqss_plugin.export import export_view
    torch.manual_seed(0)
    model = fq.prepare(LSTMTasNet(n_src=2, n_layers=2, hid_size=16, dropout=0.0, bidirectional=False, n_filters=16,
                                  kernel_size=16, stride=8, sample_rate=SR),
                       fq.QuantConfig.fqss(calib_steps=3), encoder="encoder.encoder_relu", decoder="decoder").train()
    with torch.no_grad():
        for _ in range(4):
            model(0.1 * torch.randn(2, 4000, generator=torch.Generator().manual_seed(_)))
            fq.calibration_step(model)
    model.eval()
    result = to_onnx(model, tmp_path / "lstm.onnx")
    assert sum(n.op_type == "Loop" for n in onnx.load(str(result.path)).graph.node) == 2
    separator = OrtSeparator(result.path)
    for length in (1001, 4003):
        wav = 0.2 * torch.randn(1, length, generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            expected = model(wav)
            assert torch.equal(export_view(model)(wav), expected)
        got = separator.separate(wav)
        assert 10 * np.log10(expected.pow(2).sum() / (expected - got).pow(2).sum()) > 40


def test_export_never_loses_a_file_or_hides_nan(trained, tmp_path, capsys, monkeypatch):
    """--out that is the checkpoint, an existing file or a directory: refused before any work, nothing touched;
    a write that fails half-way leaves the earlier file whole; NaN weights are refused, not folded into integers."""
    package = save_quantized_model(trained[1], tmp_path / "exp" / "best_model.pth", fq.QuantConfig.fqss(calib_steps=5))
    before = package.read_bytes()
    assert cli_main(["export", "--checkpoint", str(package), "--out", str(package)]) == 2
    assert "is the checkpoint itself" in capsys.readouterr().err and package.read_bytes() == before
    out = tmp_path / "model.onnx"
    out.write_bytes(b"an earlier result")
    assert cli_main(["export", "--checkpoint", str(package), "--out", str(out)]) == 2
    assert "exists (pass --overwrite" in capsys.readouterr().err and out.read_bytes() == b"an earlier result"
    assert cli_main(["export", "--checkpoint", str(package), "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err

    def broken_save(model, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")
    monkeypatch.setattr(onnx, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        to_onnx(trained[1], out)
    assert out.read_bytes() == b"an earlier result" and sorted(p.name for p in tmp_path.iterdir()) == ["exp", "model.onnx"]
    monkeypatch.undo()
    assert cli_main(["export", "--checkpoint", str(package), "--out", str(out), "--overwrite"]) == 0
    onnx.checker.check_model(onnx.load(str(out)))

    broken = copy.deepcopy(trained[1])
    with torch.no_grad():
        next(p for n, p in broken.named_parameters() if n.endswith("weight")).fill_(float("nan"))
    with pytest.raises(ExportError, match="NaN/Inf"):
        to_onnx(broken, tmp_path / "nan.onnx")
    assert not (tmp_path / "nan.onnx").exists()


def test_separate_never_clobbers_and_refuses_bad_samples(exported, tmp_path, capsys):
    """Outputs that would overwrite an input, each other or an earlier result are refused before any work; NaN
    input, a too-short input and a file without a sample rate get one clear message."""
    mix, _ = two_source_batch(1, 3000, torch.Generator().manual_seed(4))
    first, second = tmp_path / "a" / "x.wav", tmp_path / "b" / "x.wav"
    for path in (first, second):
        path.parent.mkdir()
        sf.write(path, mix[0].numpy(), SR, subtype="FLOAT")
    inside = tmp_path / "a" / "x_s1.wav"
    sf.write(inside, mix[0].numpy(), SR, subtype="FLOAT")
    model = str(exported.path)
    assert cli_main(["separate", "--model", model, str(first), str(inside), "--out-dir", str(tmp_path / "a")]) == 2
    assert "would overwrite the input" in capsys.readouterr().err
    assert cli_main(["separate", "--model", model, str(first), str(second), "--out-dir", str(tmp_path / "o")]) == 2
    assert "would both write" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert cli_main(["separate", "--model", model, str(first), "--out-dir", str(tmp_path / "o")]) == 0
    written = (tmp_path / "o" / "x_s1.wav").read_bytes()
    assert cli_main(["separate", "--model", model, str(second), "--out-dir", str(tmp_path / "o")]) == 2
    assert "exists (pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "o" / "x_s1.wav").read_bytes() == written
    assert cli_main(["separate", "--model", model, str(second), "--out-dir", str(tmp_path / "o"), "--overwrite"]) == 0
    nan = mix[0].numpy().copy()
    nan[100:110] = np.nan
    sf.write(tmp_path / "nan.wav", nan, SR, subtype="FLOAT")
    sf.write(tmp_path / "short.wav", mix[0, :5].numpy(), SR, subtype="FLOAT")
    for name, message in (("nan.wav", "10 NaN/Inf samples"), ("short.wav", "cannot run on these 5 samples")):
        capsys.readouterr()
        assert cli_main(["separate", "--model", model, str(tmp_path / name), "--out-dir", str(tmp_path / "n")]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    bare = onnx.load(model)
    del bare.metadata_props[:]
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    assert cli_main(["separate", "--model", str(tmp_path / "bare.onnx"), str(first), "--out-dir", str(tmp_path / "m")]) == 2
    assert "no sample_rate in its metadata" in capsys.readouterr().err
    assert cli_main(["separate", "--model", str(tmp_path / "bare.onnx"), str(first), "--out-dir", str(tmp_path / "m"),
                     "--sample-rate", str(SR)]) == 0


def test_long_recordings_run_in_chunks_with_one_source_order(exported, trained):
    """A recording longer than the chunk is separated chunk by chunk (no call sees more than a chunk), the
    sources keep their order across chunks, and the result matches the one-piece separation closely."""
    mix, sources = two_source_batch(1, 4 * SR, torch.Generator().manual_seed(21))
    whole = OrtSeparator(exported.path, chunk_seconds=None).separate(mix[0].numpy())
    chunked_separator = OrtSeparator(exported.path, chunk_seconds=1.0, overlap_seconds=0.25)
    seen = []
    forward = chunked_separator.forward
    chunked_separator.forward = lambda x: (seen.append(x.shape[-1]), forward(x))[1]
    chunked = chunked_separator.separate(mix[0].numpy())
    assert chunked.shape == whole.shape == (2, 4 * SR)
    assert len(seen) >= 5 and max(seen) == SR
    for k in range(2):                       # same order as the one-piece result, close to it
        assert 10 * np.log10((whole[k] ** 2).sum() / ((whole[k] - chunked[k]) ** 2).sum()) > 15
    swapped = OrtSeparator(exported.path, chunk_seconds=1.0, overlap_seconds=0.25)
    calls = iter(range(100))
    swapped.forward = lambda x: forward(x)[:, ::-1] if next(calls) % 2 else forward(x)   # every other chunk swapped
    realigned = swapped.separate(mix[0].numpy())
    assert np.allclose(realigned, chunked, atol=1e-6)

"""Int8 export of a quantized HTDemucs, and running the file (both registered with
:mod:`fqss_plugin.export.registry` on import, so ``fqss export`` and ``fqss separate`` take them).

The ONNX graph is the network between the STFT and the iSTFT (:meth:`QHTDemucs.network
<fqss_plugin.demucs.wrappers.QHTDemucs.network>`): both encoders, the cross-domain transformer, both
decoders, every layer on its 8-bit grid as in QAT. Inputs ``spec`` (the normalised spectrogram, complex as
channels: ``[1, 2 * audio_channels, nfft / 2, frames]``) and ``wave`` (the normalised waveform ``[1,
audio_channels, segment samples]``); outputs ``spec_out`` and ``wave_out``, both branches' estimates before
de-normalisation. Shapes are those of one training segment: Demucs runs HTDemucs on segments anyway
(``apply_model(split=True)``).

Outside the graph, in float (as in QAT): the STFT, the normalisation of both inputs by their mean and std,
the de-normalisation, the mask, the iSTFT and the sum of the branches. :class:`OrtHTDemucs` does them with
Demucs' own code around the onnxruntime session; it has Demucs' model attributes, so
``demucs.apply.apply_model`` (segments, overlap, shifts) runs it.
"""
from __future__ import annotations

import io
import json
import warnings
from fractions import Fraction
from pathlib import Path

import numpy as np
import onnx
import torch
from demucs.htdemucs import HTDemucs
from torch import nn

from ..export import passes
from ..export.export import OPSET, ExportResult, write_int8_model
from ..export.registry import PackageLoader, register_exporter, register_package_loader, register_runtime
from ..export.view import ExportError, export_view
from .package import FQSSHTDemucs
from .wrappers import QHTDemucs

ARCHITECTURE = "htdemucs"


class _Network(nn.Module):
    """``(spec, wave) -> (spec_out, wave_out)``: the exported part of a frozen quantized HTDemucs."""

    def __init__(self, model: QHTDemucs) -> None:
        super().__init__()
        self.model = model

    def forward(self, spec: torch.Tensor, wave: torch.Tensor):
        return self.model.network(spec, wave)


def _constructor_kwargs(model: FQSSHTDemucs) -> dict:
    """The float ``HTDemucs`` arguments of the package (JSON-ready): the runtime rebuilds its STFT front end."""
    _, kwargs = model._init_args_kwargs
    kwargs = {k: v for k, v in kwargs.items() if k != "fqss_config"}
    return json.loads(json.dumps(kwargs, default=lambda v: float(v) if isinstance(v, Fraction) else str(v)))


def export_htdemucs(model: FQSSHTDemucs, path: str | Path, *, target: str = "portable", integer_softmax: bool = False,
                    deploy: bool = True, metadata: dict | None = None) -> ExportResult:
    """Write the int8 ONNX file of a quantized HTDemucs (see the module's docstring)."""
    kwargs = _constructor_kwargs(model)
    front = HTDemucs(**kwargs).eval()
    view = export_view(model).model
    view.segment = front.segment                               # the package's segment, which the runtime uses
    length = int(front.segment * front.samplerate)
    mixture = 0.1 * torch.randn(1, front.audio_channels, length, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, _, spec, wave, _, _ = view.analyse(mixture)
        spec_out, wave_out = _Network(view)(spec, wave)
    if not (torch.isfinite(spec_out).all() and torch.isfinite(wave_out).all()):
        raise ExportError("the quantized HTDemucs returns NaN/Inf on the example input (a diverged training?)")
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(_Network(view), (spec, wave), buffer, dynamo=False, opset_version=OPSET,
                              input_names=["spec", "wave"], output_names=["spec_out", "wave_out"])
        except Exception as error:  # noqa: BLE001 - the exporter raises many types; say which part failed
            raise ExportError(f"torch.onnx.export failed for HTDemucs: {type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else ''}") from error
    onnx_model = onnx.load_from_string(buffer.getvalue())
    passes.fold_constant_elementwise(onnx_model)
    n_src = len(front.sources)
    info = {"architecture": ARCHITECTURE, "demucs_kwargs": json.dumps(kwargs), "producer": "fqss_plugin.demucs.export",
            "n_src": str(n_src), "sources": ",".join(front.sources), "sample_rate": str(int(front.samplerate)),
            "audio_channels": str(front.audio_channels), "integer_softmax": str(integer_softmax),
            "input": f"spec {list(spec.shape)}, wave {list(wave.shape)}: the normalised branch inputs of one segment",
            "output": f"spec_out {list(spec_out.shape)}, wave_out {list(wave_out.shape)} before de-normalisation",
            **{k: str(v) for k, v in (metadata or {}).items()}}
    path, notes = Path(path), []
    changes = write_int8_model(onnx_model, path, info, notes, target=target, integer_softmax=integer_softmax,
                               deploy=deploy)
    return ExportResult(path, path.stat().st_size, n_src, int(front.samplerate), changes,
                        passes.tensor_bytes(onnx_model), 0, notes)


class OrtHTDemucs(nn.Module):
    """An exported HTDemucs as a Demucs model: ``forward(mix [batch, channels, time])`` runs the float STFT
    front end (Demucs' code, rebuilt from the file's ``demucs_kwargs``), the int8 network in onnxruntime, and
    the float back end; ``demucs.apply.apply_model`` runs it on segments. :meth:`separate` is
    :class:`~fqss_plugin.export.OrtSeparator`'s interface for ``fqss separate``."""

    def __init__(self, path: str | Path, threads: int = 1, chunk_seconds: float | None = None) -> None:
        super().__init__()
        import onnxruntime as ort

        from ..export.runtime import _refuse_if_it_would_saturate, session_options
        self.path = Path(path)
        self.session = ort.InferenceSession(str(self.path), session_options(threads), providers=["CPUExecutionProvider"])
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        if self.metadata.get("architecture") != ARCHITECTURE:
            raise ValueError(f"{path}: not an HTDemucs file written by fqss export")
        _refuse_if_it_would_saturate(self.path, self.metadata)
        self.front = HTDemucs(**json.loads(self.metadata["demucs_kwargs"])).eval()
        self.samplerate, self.segment = self.front.samplerate, self.front.segment
        self.sources, self.audio_channels = list(self.front.sources), self.front.audio_channels
        self.sample_rate, self.n_src = int(self.samplerate), len(self.sources)

    def valid_length(self, length: int) -> int:
        """One segment: ``apply_model`` then pads a shorter chunk with the mixture around it, as it does for an
        ``HTDemucs``."""
        return int(self.segment * self.samplerate)

    @torch.no_grad()
    def forward(self, mix: torch.Tensor) -> torch.Tensor:
        if mix.shape[-1] > int(self.segment * self.samplerate):
            raise ValueError(f"OrtHTDemucs runs one segment ({self.segment} s) at a time; use "
                             "demucs.apply.apply_model(model, mix, split=True)")
        out = []
        for one in mix.split(1):
            _, z, spec, wave, stats, lengths = QHTDemucs.analyse(self.front, one)
            spec_out, wave_out = self.session.run(None, {"spec": spec.numpy(), "wave": wave.numpy()})
            out.append(QHTDemucs.synthesise(self.front, z, torch.from_numpy(spec_out), torch.from_numpy(wave_out),
                                            stats, lengths))
        return torch.cat(out)

    def separate(self, mixture) -> np.ndarray:
        """``[channels, time]`` -> ``[n_src, channels, time]``, as ``demucs.separate``: the mixture normalised by
        its mono downmix's mean and std, ``apply_model`` on overlapping segments, then de-normalised."""
        from .recipe import separator
        stems = separator(self, shifts=0)(np.asarray(mixture, dtype=np.float32).T, self.samplerate)
        return np.stack([stems[source].T for source in self.sources])


def load_quantized_package(source: str) -> FQSSHTDemucs:
    """A quantized HTDemucs from its Demucs package (``<name>.th``), through Demucs' own loader."""
    from demucs.states import load_model
    try:
        model = load_model(source)
    except Exception as error:  # noqa: BLE001 - unpickling raises many types; one clear message
        raise ValueError(f"{source}: not a readable Demucs package ({type(error).__name__}: {error})") from None
    if not isinstance(model, FQSSHTDemucs):
        raise ValueError(f"{source}: a float {type(model).__name__}, not a quantized fqss model (train one with "
                         "recipes/MUSDB18/HTDemucs conf/fqss.yaml)")
    return model


def _load_float(source: str) -> nn.Module:
    from demucs.states import load_model
    return load_model(source)


register_exporter(FQSSHTDemucs, export_htdemucs)
register_runtime(ARCHITECTURE, OrtHTDemucs)
register_package_loader(PackageLoader(
    toolkit="demucs", matches=lambda source: Path(source).suffix == ".th" and Path(source).is_file(),
    load=load_quantized_package, executes_code=True, load_float=_load_float,
    describe="a Demucs package (<name>.th) written by the HTDemucs recipe; Demucs' loader unpickles it, so "
             "only with --trust-package"))

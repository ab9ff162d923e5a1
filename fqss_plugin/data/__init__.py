"""Embedded default datasets in the real on-disk formats.

* :mod:`~fqss_plugin.data.speech`: synthetic Libri2Mix (espeak-ng / flite voices,
  LibriMix layout, metadata and mixing rule), plus the files Asteroid's and
  SpeechBrain's LibriMix recipes expect beside it (:mod:`~fqss_plugin.data.librimix`).
* :mod:`~fqss_plugin.data.music`: a toy MUSDB18-HQ.

Real recorded speech (sources in ``SOURCES.md``): ``fqss make-data real-sources``
extracts it (:mod:`~fqss_plugin.data.real_sources`), ``fqss make-data speech --real-speech DIR``
mixes it with the synthetic voices and adds a real-only ``test-real`` split
(:mod:`~fqss_plugin.data.real`), with realism augmentation of train/dev voices
(:mod:`~fqss_plugin.data.augment`).

Command line: ``fqss make-data {speech,music,merge-train,real-sources} --out DIR`` (:mod:`~fqss_plugin.data.cli`).
The building blocks are :mod:`~fqss_plugin.data.text` (sentences),
:mod:`~fqss_plugin.data.voices` (speakers), :mod:`~fqss_plugin.data.loudness`
(BS.1770), :mod:`~fqss_plugin.data.pitch` (f0 check), :mod:`~fqss_plugin.data.noise`.
"""

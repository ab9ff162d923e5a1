"""Embedded default datasets in the real on-disk formats (issue #4).

* :mod:`~fqss_plugin.data.speech`: synthetic Libri2Mix (espeak-ng / flite voices,
  LibriMix layout, metadata and mixing rule), plus the files Asteroid's and
  SpeechBrain's LibriMix recipes expect beside it (:mod:`~fqss_plugin.data.librimix`).
* :mod:`~fqss_plugin.data.music`: a toy MUSDB18-HQ.

Command line: ``fqss make-data {speech,music} --out DIR`` (:mod:`~fqss_plugin.data.cli`).
The building blocks are :mod:`~fqss_plugin.data.text` (sentences),
:mod:`~fqss_plugin.data.voices` (speakers), :mod:`~fqss_plugin.data.loudness`
(BS.1770), :mod:`~fqss_plugin.data.pitch` (f0 check), :mod:`~fqss_plugin.data.noise`.
"""

"""``fqss make-data {speech,music,merge-train,real-sources}`` (also ``python -m fqss_plugin.data ...``).

``add_arguments(parser)`` and ``run(args) -> int`` are the interface the ``fqss``
dispatcher (:mod:`fqss_plugin.cli`) expects.  Bad input and missing tools end
with a one-line ``error: ...`` and exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fqss_plugin.data.errors import DataGenerationError
from fqss_plugin.data.librimix import MIX_TYPES, MODES, SAMPLE_RATES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``speech``, ``music``, ``merge-train`` and ``real-sources`` sub-commands and their options."""
    sub = parser.add_subparsers(dest="dataset", required=True, metavar="{speech,music,merge-train,real-sources}")
    jobs_default = os.cpu_count() or 1

    speech = sub.add_parser("speech", help="synthetic Libri2Mix (LibriMix layout and metadata)",
                            description="Synthesize TTS utterances and mix them into a Libri2Mix-layout dataset.")
    speech.add_argument("--out", type=Path, required=True, help="output root (gets LibriSpeech/, Libri2Mix/, data/)")
    speech.add_argument("--hours", type=float, default=1.0,
                        help="hours of train-360 mixtures in min mode (default 1.0; dev/test get 10%% each)")
    speech.add_argument("--seed", type=int, default=0, help="random seed; same seed, same data (default 0)")
    speech.add_argument("--sample-rate", type=int, nargs="+", choices=SAMPLE_RATES, default=[8000],
                        dest="sample_rates", help="one or both of 8000 16000 (default 8000)")
    speech.add_argument("--mode", nargs="+", choices=MODES, default=["min"], dest="modes",
                        help="LibriMix length mode(s) (default min)")
    speech.add_argument("--types", nargs="+", choices=MIX_TYPES, default=list(MIX_TYPES),
                        help="mixture types (default all three; mix_clean alone writes no noise)")
    speech.add_argument("--train-speakers", type=int, default=100, help="voices in train-360 (default 100)")
    speech.add_argument("--eval-speakers", type=int, default=20,
                        help="voices in each of dev, test, test-flite (default 20)")
    speech.add_argument("--eval-mixtures", type=int, default=None,
                        help="mixtures in each of dev, test, test-flite (default 10%% of train)")
    speech.add_argument("--no-cross-engine", action="store_false", dest="cross_engine",
                        help="skip the flite test-flite split (then flite is not needed)")
    real = speech.add_argument_group(
        "real speech", "mix real recordings with the synthetic voices: their speakers are split disjointly into "
                       "train-360, dev and a real-only test-real split (seeded hash of the speaker name)")
    real.add_argument("--real-speech", type=Path, default=None, metavar="DIR",
                      help="folder of real recordings: <speaker>/<file>.wav|flac|ogg at any depth (the output of "
                           "`fqss make-data real-sources`), or a flat folder named by --speaker-pattern")
    real.add_argument("--speaker-pattern", default=None, metavar="REGEX",
                      help="for files directly in DIR: regex whose first group is the speaker "
                           r"(default '^([^_\-]+)')")
    real.add_argument("--real-fraction", type=float, default=0.5,
                      help="probability that a train-360 voice is a real speaker (default 0.5)")
    real.add_argument("--real-dev-fraction", type=float, default=0.1,
                      help="fraction of each source's speakers held out for dev (default 0.1)")
    real.add_argument("--real-test-fraction", type=float, default=0.15,
                      help="fraction of each source's speakers held out for test-real (default 0.15)")
    real.add_argument("--real-test-mixtures", type=int, default=None,
                      help="mixtures in test-real (default: as many as the other evaluation splits)")
    augment = real.add_mutually_exclusive_group()
    augment.add_argument("--augment", action="store_true", default=None,
                         help="speed, pitch, EQ, room (RIR), level and noise variation of every train-360/dev "
                              "voice (default: on with --real-speech, off without)")
    augment.add_argument("--no-augment", action="store_false", dest="augment", help="no realism augmentation")
    _add_common(speech, jobs_default)

    music = sub.add_parser("music", help="toy MUSDB18-HQ (44.1 kHz stereo stems)",
                           description="Synthesize songs with drums, bass, other and vocals stems in "
                                       "MUSDB18-HQ's layout.")
    music.add_argument("--out", type=Path, required=True, help="output root (gets train/ and test/)")
    music.add_argument("--train-tracks", type=int, default=8, help="songs in train/ (default 8)")
    music.add_argument("--test-tracks", type=int, default=3, help="songs in test/ (default 3)")
    music.add_argument("--valid-tracks", type=int, default=2,
                       help="train songs named after musdb validation tracks (default 2)")
    music.add_argument("--seconds", type=float, default=20.0, help="song length (default 20)")
    music.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    _add_common(music, jobs_default)

    merge = sub.add_parser("merge-train", help="Asteroid metadata whose train-360 joins several generated datasets",
                           description="Write LibriMix metadata (wav*/<mode>/<split>/*.csv) whose train split lists "
                                       "the mixtures of BASE and every EXTRA; dev and test stay BASE's.")
    merge.add_argument("--out", type=Path, required=True, help="the merged data/ folder (pass it as --data_dir)")
    merge.add_argument("base", type=Path, help="data/ folder whose dev and test are kept")
    merge.add_argument("extras", type=Path, nargs="+", help="data/ folders whose train mixtures are added")
    merge.add_argument("--split", default="train-360", help="the split to merge (default train-360)")

    sources = sub.add_parser(
        "real-sources", help="extract real recorded speech into <source>/<speaker>/*.wav (for --real-speech)",
        description="Extract recordings from fetched git directories (free-spoken-digit-dataset, Resemblyzer) "
                    "and Debian packages (.deb files or unpacked trees: asterisk-core-sounds-*-wav, "
                    "asterisk-prompt-it-menardi-wav, ktuberling-data, klettres-data) into "
                    "OUT/<source>/<speaker>/<name>.wav, plus OUT/real_sources.csv. See SOURCES.md.")
    sources.add_argument("--out", type=Path, required=True, help="output folder")
    sources.add_argument("sources", type=Path, nargs="+", metavar="SOURCE",
                         help="a fetched bare git directory, a .deb, or a folder holding an unpacked Debian tree")
    sources.add_argument("--overwrite", action="store_true", help="replace earlier output in --out")


def _add_common(parser: argparse.ArgumentParser, jobs_default: int) -> None:
    parser.add_argument("--jobs", type=int, default=jobs_default,
                        help=f"worker processes (default: CPU count, {jobs_default})")
    parser.add_argument("--overwrite", action="store_true", help="replace this generator's earlier output in --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """Generate the requested dataset and print its summary; 2 on a user-facing error."""
    try:
        if args.dataset == "real-sources":
            from fqss_plugin.data.real_sources import extract_real_sources, format_real_sources_summary

            print(format_real_sources_summary(args.out, extract_real_sources(args.out, args.sources,
                                                                             args.overwrite)))
        elif args.dataset == "merge-train":
            from fqss_plugin.data.librimix import merge_train_metadata

            written = merge_train_metadata(args.out, args.base, args.extras, args.split)
            merged = [path for path in written if path.parent.name == args.split]
            print(f"merged metadata written to {args.out}: " + ", ".join(
                f"{path.name} {len(path.read_text().splitlines()) - 1} rows" for path in merged))
        elif args.dataset == "speech":
            from fqss_plugin.data.speech import SpeechConfig, generate_speech

            config = SpeechConfig(
                out=args.out, hours=args.hours, seed=args.seed, sample_rates=tuple(dict.fromkeys(args.sample_rates)),
                modes=tuple(dict.fromkeys(args.modes)), mix_types=tuple(dict.fromkeys(args.types)),
                train_speakers=args.train_speakers, eval_speakers=args.eval_speakers,
                eval_mixtures=args.eval_mixtures, cross_engine=args.cross_engine, jobs=args.jobs,
                overwrite=args.overwrite, progress=not args.quiet, real_speech=args.real_speech,
                speaker_pattern=args.speaker_pattern, real_fraction=args.real_fraction,
                real_dev_fraction=args.real_dev_fraction, real_test_fraction=args.real_test_fraction,
                real_test_mixtures=args.real_test_mixtures, augment=args.augment)
            print(format_speech_summary(generate_speech(config)))
        else:
            from fqss_plugin.data.music import MusicConfig, generate_music

            config = MusicConfig(
                out=args.out, train_tracks=args.train_tracks, test_tracks=args.test_tracks,
                valid_tracks=args.valid_tracks, seconds=args.seconds, seed=args.seed, jobs=args.jobs,
                overwrite=args.overwrite, progress=not args.quiet)
            print(format_music_summary(generate_music(config)))
    except DataGenerationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def format_speech_summary(summary: dict) -> str:
    """Human-readable lines of :func:`fqss_plugin.data.speech.generate_speech`'s summary."""
    splits = ", ".join(f"{name} {s['mixtures']} mixtures / {s['hours']:.2f} h" for name, s in summary["splits"].items())
    disk = "; ".join(f"{name} {d['MB']} MB ({d['MB_per_hour_of_mixtures']} MB per hour of mixtures)"
                     for name, d in summary["librimix_disk"].items())
    lines = [
        f"speech data written to {summary['config']['out']}",
        f"  splits: {splits}",
        f"  synthesis: {summary['utterances']} utterances (mean {summary['utterance_seconds_mean']} s) in "
        f"{summary['synthesis_seconds']} s = {summary['utterances_per_minute']} utterances/min",
        f"  mixing: {summary['mixtures_per_minute']} mixtures/min ({summary['mixing_seconds']} s)",
        f"  disk: {disk}; LibriSpeech {summary['librispeech_disk']['MB']} MB",
    ]
    f0 = summary["f0"]
    for sex, label in (("F", "female"), ("M", "male")):
        if sex in f0:
            s = f0[sex]
            lines.append(f"  f0 of {s['voices']} {label} voices (median per voice): "
                         f"{s['min_hz']}-{s['max_hz']} Hz, median {s['median_hz']} Hz")
    if "pair_gap_semitones" in f0:
        gap = f0["pair_gap_semitones"]
        lines.append(f"  f0 gap within mixtures: median {gap['median']} semitones, "
                     f"{100 * gap['fraction_below_1']:.1f}% below 1 semitone")
    if summary.get("augmented_splits"):
        lines.append(f"  augmented (speed, pitch, EQ, room, level, noise): {', '.join(summary['augmented_splits'])}")
    for split, names in summary.get("real_speakers", {}).items():
        lines.append(f"  real speakers in {split} ({len(names)}): {' '.join(names)}")
    return "\n".join(lines)


def format_music_summary(summary: dict) -> str:
    """Human-readable lines of :func:`fqss_plugin.data.music.generate_music`'s summary."""
    return "\n".join([
        f"music data written to {summary['config']['out']}",
        f"  train: {len(summary['tracks']['train'])} songs, test: {len(summary['tracks']['test'])} songs, "
        f"{summary['hours']:.3f} h in {summary['seconds']} s ({summary['tracks_per_minute']} songs/min)",
        f"  disk: {summary['MB']} MB ({summary['MB_per_hour']} MB per hour)",
    ])

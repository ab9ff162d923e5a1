"""Score a Lightning checkpoint of a float run on the synthetic and the real-voice test splits.

    python local/eval_checkpoint.py exp/teacher_real/checkpoints/epoch=8-step=7353.ckpt exp/eval_ep8 DATA/data

packages the checkpoint as ``<out>/best_model.pth`` (``write_best_model``) and writes
``<out>/eval_test/`` and ``<out>/eval_test-real/`` (``final_metrics.json``, as ``eval.py``), printing SI-SDR(i).
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import train  # noqa: E402  (this recipe's train.py: build_float_model)

from fqss_plugin.asteroid.recipe import evaluate, parse_conf, write_best_model  # noqa: E402


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    checkpoint, out, data = argv
    conf = parse_conf(Path(__file__).resolve().parent.parent / "conf" / "float.yml",
                      ["--exp_dir", out, "--data_dir", data, "--progress_bar", "false"])
    Path(out).mkdir(parents=True, exist_ok=True)
    write_best_model(conf, train.build_float_model(conf), checkpoint)
    for split in ("test", "test-real"):
        conf["data"]["test_split"] = split
        result = evaluate(conf, out_dir=Path(out) / f"eval_{split}")
        print(split, json.dumps({k: round(v, 3) for k, v in result.items() if k in ("si_sdr", "si_sdr_imp")}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

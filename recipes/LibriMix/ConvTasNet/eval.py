"""Evaluate a trained (float or quantized) separator on the Libri2Mix test split.

    python eval.py --conf conf/fqss.yml --exp_dir exp/fqss      # writes exp/fqss/eval/final_metrics.json
"""
import sys

from fqss_plugin.asteroid.recipe import run_eval

if __name__ == "__main__":
    sys.exit(run_eval())

"""Evaluate a trained (float or quantized) separator on the Libri2Mix test split.

    python eval.py --conf conf/fqss.yml --exp_dir exp/fqss      # writes exp/fqss/eval/final_metrics.json
"""
import json
import sys

from fqss_plugin.asteroid_recipe import RecipeError, evaluate, parse_conf

if __name__ == "__main__":
    conf_path = sys.argv[sys.argv.index("--conf") + 1] if "--conf" in sys.argv else "conf/fqss.yml"
    try:
        conf = parse_conf(conf_path, sys.argv[1:])
        conf["main_args"]["exp_dir"] = conf["main_args"]["exp_dir"] or f"exp/{conf['quant']['mode']}"
        print(json.dumps(evaluate(conf), indent=2))
    except (RecipeError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")

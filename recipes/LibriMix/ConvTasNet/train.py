"""Train a ConvTasNet on (embedded or real) Libri2Mix: float teacher, vanilla QAT or FQSS QAT.

    python train.py --conf conf/float.yml   --exp_dir exp/float
    python train.py --conf conf/vanilla.yml --exp_dir exp/vanilla --pretrained exp/float
    python train.py --conf conf/fqss.yml    --exp_dir exp/fqss    --pretrained JorisCos/ConvTasNet_Libri2Mix_sepclean_8k

Every leaf of the yaml is also a flag (``--lr 1e-4``, ``--data_dir DIR``), as in Asteroid's recipes.
"""
import sys

from asteroid.models import ConvTasNet

from fqss_plugin.asteroid.recipe import run_train


def build_float_model(conf: dict) -> ConvTasNet:
    return ConvTasNet(n_src=conf["data"]["n_src"], sample_rate=conf["data"]["sample_rate"], **conf["filterbank"],
                      **conf["masknet"])


if __name__ == "__main__":
    sys.exit(run_train(build_float_model))

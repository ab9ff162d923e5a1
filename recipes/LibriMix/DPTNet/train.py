"""Train a DPTNet on (embedded or real) Libri2Mix: float teacher, vanilla QAT or FQSS QAT.

    python train.py --conf conf/float.yml   --exp_dir exp/float
    python train.py --conf conf/fqss.yml    --exp_dir exp/fqss    --pretrained exp/float

Attention and BiLSTM internals (q, k, v, logits, softmax, attn·V, gates, cell and hidden states)
are quantized by fqss's QMultiheadAttention and QLSTM. No public DPTNet Libri2Mix sep_clean 8 kHz
model exists on the hub: train the float teacher with conf/float.yml first.
"""
import sys

from asteroid.models import DPTNet

from fqss_plugin.asteroid.recipe import run_train


def build_float_model(conf: dict) -> DPTNet:
    return DPTNet(n_src=conf["data"]["n_src"], sample_rate=conf["data"]["sample_rate"], **conf["filterbank"],
                  **conf["masknet"])


if __name__ == "__main__":
    sys.exit(run_train(build_float_model))

"""Train a DPTNet on (embedded or real) Libri2Mix: float teacher, vanilla QAT or FQSS QAT.

    python train.py --conf conf/float.yml   --exp_dir exp/float
    python train.py --conf conf/fqss.yml    --exp_dir exp/fqss    --pretrained exp/float

Every leaf of the yaml is also a flag (``--lr 1e-4``, ``--data_dir DIR``), as in Asteroid's recipes.

Attention and BiLSTM internals (q, k, v, logits, softmax, attn·V, gates, cell and hidden states)
are quantized by fqss's QMultiheadAttention and QLSTM. No public DPTNet Libri2Mix sep_clean 8 kHz
model exists on the hub: train the float teacher with conf/float.yml first.
"""
import sys

import torch
from asteroid.engine.optimizers import make_optimizer
from asteroid.models import DPTNet

from fqss_plugin.asteroid import FQSSSystem
from fqss_plugin.asteroid.recipe import (build_models, fit, make_loaders, make_loss, make_trainer, quant_config, run,
                                         start_experiment, write_best_model)
from fqss_plugin.quant import parameter_groups


def build_float_model(conf: dict) -> DPTNet:
    return DPTNet(n_src=conf["data"]["n_src"], sample_rate=conf["data"]["sample_rate"], **conf["filterbank"],
                  **conf["masknet"])


def main(conf: dict):
    """Train (or fine-tune with QAT), resuming from ``checkpoints/last.ckpt``; returns ``best_model.pth``."""
    exp_dir = start_experiment(conf)
    train_loader, val_loader = make_loaders(conf)

    # float: the model of the conf; QAT: the pretrained float model, quantized, and its float copy (the teacher)
    config = None if conf["quant"]["mode"] == "float" else quant_config(conf)
    model, teacher = build_models(conf, build_float_model, config)
    # the quantizers' ranges learn at their own rate (QuantConfig.quantizer_lr)
    params = model.parameters() if config is None else parameter_groups(model, config.quantizer_lr)
    optimizer = make_optimizer(params, **conf["optim"])
    scheduler = None
    if conf["training"]["half_lr"]:
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer=optimizer, factor=0.5, patience=5)

    system = FQSSSystem(model=model, loss_func=make_loss(conf), optimizer=optimizer, train_loader=train_loader,
                        val_loader=val_loader, scheduler=scheduler, config=conf, teacher=teacher)
    trainer, _ = make_trainer(conf, exp_dir)
    best = fit(trainer, system, exp_dir)
    return write_best_model(conf, system.model, best)


if __name__ == "__main__":
    sys.exit(run(main))

"""Calibration under DistributedDataParallel: two CPU ranks (gloo) see different data and still end
calibration, and training, with identical quantizer state."""
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import fqss_plugin as fq
from fqss_plugin.quant import ActivationQuantizer, calibration_step

STEPS, CALIB_STEPS, WORLD = 4, 2, 2


class ConvLSTMAttention(nn.Module):
    """Conv encoder -> BiLSTM -> self-attention -> linear, ``[B, T] -> [B, T', 1]``."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Conv1d(1, 8, 4, stride=2)
        self.lstm = nn.LSTM(8, 6, batch_first=True, bidirectional=True)
        self.mha = nn.MultiheadAttention(12, 2, batch_first=True)
        self.head = nn.Linear(12, 1)

    def forward(self, x):
        y = self.encoder(x.unsqueeze(1)).transpose(1, 2)
        y = self.lstm(y)[0]
        y = self.mha(y, y, y, need_weights=False)[0]
        return self.head(y)


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        for all_reduce in (True, False):
            result = _train(rank, all_reduce)
            torch.save(result, f"{out_dir}/rank{rank}_{'synced' if all_reduce else 'local'}.pt")
    finally:
        dist.destroy_process_group()


def _train(rank: int, all_reduce: bool) -> dict:
    """Prepare, wrap in DDP, run STEPS optimizer steps on this rank's shard; return the final state."""
    torch.manual_seed(0)                                      # same initial weights on both ranks
    model = fq.prepare(ConvLSTMAttention(), fq.QuantConfig.vanilla(calib_steps=CALIB_STEPS), encoder="encoder")
    # broadcast_buffers=False: only calibration_step's all-reduce may synchronise the ranges.
    # DDP's defaults (find_unused_parameters=False) work: calibrating ranges stay in the graph with a
    # zero gradient. broadcast_buffers=False: only calibration_step's all-reduce may synchronise ranges.
    ddp = DistributedDataParallel(model, broadcast_buffers=False)
    optimizer = torch.optim.Adam(ddp.parameters(), lr=1e-2)
    data = torch.Generator().manual_seed(100 + rank)          # a different shard per rank...
    gain = 1.0 + 3.0 * rank                                   # ...at a different level
    first_ranges = {}
    for step in range(STEPS):
        x = gain * torch.randn(4, 40, generator=data)
        target = gain * torch.randn(4, 19, 1, generator=data)
        optimizer.zero_grad()
        (ddp(x) - target).pow(2).mean().backward()
        optimizer.step()
        if step == 0:
            first_ranges = {name: torch.stack([m.pending_min, m.pending_max]).clone()
                            for name, m in model.named_modules() if isinstance(m, ActivationQuantizer)}
        if all_reduce:
            calibration_step(model)
        else:                                                 # what each rank would do on its own
            for module in model.modules():
                if isinstance(module, ActivationQuantizer) and module.calibrating and bool(module.has_pending):
                    module.end_calibration_step()
    return {"state": model.state_dict(), "first_ranges": first_ranges}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Both ranks' results, with calibration_step's all-reduce ("synced") and without it ("local")."""
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("needs torch.distributed with gloo")
    out_dir = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return {mode: [torch.load(out_dir / f"rank{rank}_{mode}.pt") for rank in range(WORLD)]
            for mode in ("synced", "local")}


def _quantizer_state(state: dict) -> dict:
    return {k: v for k, v in state.items() if "_quantizer" in k}


def test_two_ranks_on_different_data_end_with_identical_quantizer_state(ranks):
    rank0, rank1 = ranks["synced"]
    # the ranks really saw different ranges: unsynchronised calibration would diverge
    first0, first1 = rank0["first_ranges"], rank1["first_ranges"]
    differing = [name for name in first0 if not torch.equal(first0[name], first1[name])]
    assert len(differing) == len(first0) > 20
    assert any(".lstm.quantizers.l0_reverse." in "." + n for n in differing)
    assert any(n.startswith("mha.") for n in differing)

    state0, state1 = _quantizer_state(rank0["state"]), _quantizer_state(rank1["state"])
    assert state0.keys() == state1.keys() and len(state0) > 200
    different = [k for k in state0 if not torch.equal(state0[k], state1[k])]
    assert different == [], different[:10]
    # calibration is over on both ranks; the learned ranges moved after it, identically
    assert all(int(v) == CALIB_STEPS for k, v in state0.items() if k.endswith("steps_observed"))
    assert not any(bool(v) for k, v in state0.items() if k.endswith("has_pending"))
    weights_equal = [torch.equal(rank0["state"][k], rank1["state"][k]) for k in rank0["state"] if "_quantizer" not in k]
    assert all(weights_equal)


def test_without_the_all_reduce_the_ranks_would_diverge(ranks):
    rank0, rank1 = ranks["local"]
    state0, state1 = _quantizer_state(rank0["state"]), _quantizer_state(rank1["state"])
    assert not torch.equal(state0["lstm.quantizers.l0.cell_quantizer.running_max"],
                           state1["lstm.quantizers.l0.cell_quantizer.running_max"])
    assert not torch.equal(state0["mha.logits_quantizer.log_scale"], state1["mha.logits_quantizer.log_scale"])

"""Distributed data parallel on the CPU (gloo): two processes, a few steps on the synthetic data.

Both ranks must end with identical parameters (DDP averages the gradients) and identical BatchNorm
buffers (computed per rank from its own half-batch, rank 0's broadcast by DDP before each forward),
and only rank 0 may write the run directory (one metrics row per epoch, world_size 2)."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out: str, hashes: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import argparse

    from crosslayer.cli.train import add_arguments, build_config
    from crosslayer.train.loop import Trainer

    p = argparse.ArgumentParser()
    add_arguments(p)
    cfg = build_config(p.parse_args([
        # a DenseNet: gradients come out of the fused block autograd nodes, which DDP must reduce like any other
        "--model", "densenet_bc40_k12", "--model-arg", "growth_rate=4", "--data", "synthetic+", "--preset", "densenet",
        "--epochs", "2", "--batch-size", "32",
        "--limit", "64", "--device", "cpu", "--quiet", "--checkpoint-every", "1"]))
    trainer = Trainer(cfg, out)
    assert trainer.run() == 0
    params = [p.detach().double().flatten() for p in trainer.model.parameters()]
    flat = torch.cat(params)
    torch.save({k: v.clone() for k, v in trainer.model.state_dict().items() if "running" in k or "num_batches" in k},
               os.path.join(hashes, f"buffers{rank}.pt"))
    with open(os.path.join(hashes, f"rank{rank}.json"), "w") as f:
        json.dump({"sum": flat.sum().item(), "abs": flat.abs().sum().item(), "first": flat[:16].tolist(),
                   "world_size": trainer.info.world_size, "steps": trainer.step}, f)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")
def test_two_process_ddp_on_cpu(tmp_path):
    out, hashes = str(tmp_path / "run"), str(tmp_path / "hashes")
    os.makedirs(hashes)
    mp.spawn(_worker, args=(2, _free_port(), out, hashes), nprocs=2, join=True)
    r0 = json.load(open(os.path.join(hashes, "rank0.json")))
    r1 = json.load(open(os.path.join(hashes, "rank1.json")))
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["steps"] == r1["steps"] == 4  # 64 images / global batch 32 = 2 steps per epoch
    assert r0["first"] == r1["first"] and r0["sum"] == r1["sum"] and r0["abs"] == r1["abs"]
    # BatchNorm buffers: each rank normalises with its own half-batch (no SyncBatchNorm), and DDP
    # broadcasts rank 0's running statistics before every forward, so the ranks evaluate (and end)
    # with the same statistics, the ones last.pt holds
    b0, b1 = (torch.load(os.path.join(hashes, f"buffers{r}.pt")) for r in (0, 1))
    assert b0.keys() == b1.keys() and any("running_mean" in k for k in b0)
    for k in b0:
        assert torch.equal(b0[k], b1[k]), k
        if "num_batches" in k:
            assert b0[k].item() == 4, k
    ck0 = torch.load(os.path.join(out, "last.pt"), map_location="cpu", weights_only=True)["model"]
    for k in b0:  # the checkpoint holds rank 0's statistics
        assert torch.equal(ck0[k], b0[k]), k
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["world_size"] == 2 and cfg["per_rank_batch_size"] == 16
    lines = open(os.path.join(out, "metrics.csv")).read().splitlines()
    assert len(lines) == 3  # header + one row per epoch, written once (rank 0)
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["epoch"] for r in rows] == [1, 2]
    ck = torch.load(os.path.join(out, "last.pt"), map_location="cpu", weights_only=True)
    assert ck["step"] == 4 and not any(k.startswith("module.") for k in ck["model"])
    assert sorted(os.listdir(out)) == sorted(["best.pt", "config.json", "last.pt", "last.pt.prev", "metrics.csv",
                                              "metrics.jsonl", "metrics_steps.csv", "results.json"])


def _resume_worker(rank: int, world_size: int, port: int, out: str, hashes: str, extra: list, tag: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import argparse

    from crosslayer.cli.train import add_arguments, build_config
    from crosslayer.train.loop import Trainer

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args([
        "--model", "densenet_bc40_k12", "--model-arg", "growth_rate=4", "--drop-rate", "0.2", "--data", "synthetic",
        "--epochs", "1", "--batch-size", "16", "--limit", "64", "--device", "cpu", "--quiet", "--deterministic",
        *extra])
    trainer = Trainer(build_config(args), out, resume=args.resume)
    assert trainer.run() == 0
    flat = torch.cat([p.detach().double().flatten() for p in trainer.model.parameters()])
    torch.save(flat, os.path.join(hashes, f"{tag}_rank{rank}.pt"))


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")
def test_mid_epoch_resume_under_ddp_is_exact_on_every_rank(tmp_path):
    """Dropout draws from each rank's global RNG; after a stop in the middle of the epoch, --resume
    must continue every rank's stream (not only rank 0's), so the weights equal an uninterrupted run."""
    hashes = str(tmp_path / "h")
    os.makedirs(hashes)
    whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
    mp.spawn(_resume_worker, args=(2, _free_port(), whole, hashes, [], "whole"), nprocs=2, join=True)
    mp.spawn(_resume_worker, args=(2, _free_port(), split, hashes, ["--max-steps", "2"], "stop"), nprocs=2, join=True)
    assert torch.load(os.path.join(split, "last.pt"), weights_only=True)["batch_in_epoch"] == 2  # of 4
    mp.spawn(_resume_worker, args=(2, _free_port(), split, hashes, ["--resume"], "resumed"), nprocs=2, join=True)
    for rank in (0, 1):
        a = torch.load(os.path.join(hashes, f"whole_rank{rank}.pt"))
        b = torch.load(os.path.join(hashes, f"resumed_rank{rank}.pt"))
        assert torch.equal(a, b), rank

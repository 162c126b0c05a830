"""The expert-parallel layer on one GPU through NCCL (a group of one rank exchanging with itself):
tools/ep_one_gpu.py's cases in-process. Skipped without CUDA and NCCL."""

import importlib.util
import pathlib

import pytest
import torch
import torch.distributed as dist

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and dist.is_available() and dist.is_nccl_available()),
    reason="needs a CUDA GPU and NCCL",
)


def _tool():
    path = pathlib.Path(__file__).resolve().parents[1] / "tools" / "ep_one_gpu.py"
    spec = importlib.util.spec_from_file_location("ep_one_gpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ep_layer_over_nccl_equals_local_layer(tmp_path, monkeypatch):
    monkeypatch.setenv("COSCALE_EP_LOOPBACK", "1")
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1)
    try:
        results = _tool().check_ep_layer(device)
    finally:
        dist.destroy_process_group()
    for r in results:
        print(r)
    assert all(r["ok"] for r in results), results
    assert all(r["bytes"] > 0 for r in results)


def test_loopback_needs_the_variable(monkeypatch):
    monkeypatch.delenv("COSCALE_EP_LOOPBACK", raising=False)
    with pytest.raises(SystemExit, match="COSCALE_EP_LOOPBACK"):
        _tool().check_ep_layer(torch.device("cuda", 0))

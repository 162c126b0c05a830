"""What a training run must fit (coscale.train.memory): the weights, gradients and AdamW moments the header
reports, the refusal of a run whose state alone exceeds the GPU, and an out-of-memory error during the steps as
one line that says what to change."""

import pytest
import torch

from coscale.cli import main
from coscale.config import ModelConfig
from coscale.errors import CoscaleError
from coscale.model import DeepseekForCausalLM
from coscale.train import loop
from coscale.train import memory as mem
from coscale.train.optim import build_optimizer

OVERRIDES = dict(
    num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=2,
    q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_group=2, topk_group=1,
    first_k_dense_replace=1, vocab_size=300,
)
RUN = ["train", "--model", "tiny", "--steps", "3", "--batch-size", "2", "--seq-len", "16", "--no-progress",
       "--no-tensorboard", "--no-checkpoints", "--eval-interval", "0", "--threads", "1"]
TORCH_OOM = ("CUDA out of memory. Tried to allocate 896.00 MiB. GPU 0 has a total capacity of 79.18 GiB of which "
             "382.12 MiB is free. Including non-PyTorch memory, this process has 78.79 GiB memory in use.")


@pytest.mark.parametrize("moments", ["fp32", "bf16"])
def test_the_state_bytes_are_what_one_optimizer_step_allocates(moments):
    """The prediction against the tensors themselves: after a backward and a step, the gradients and the
    optimizer's moment buffers hold exactly the bytes predicted before them."""
    torch.manual_seed(0)
    model = DeepseekForCausalLM(ModelConfig(**OVERRIDES))
    opt = build_optimizer(model, lr=1e-3, moments_dtype=moments)
    weights, grads, moment_bytes = mem.run_state_bytes(model, opt, moments)
    assert weights == sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    ids = torch.randint(0, 300, (2, 16))
    model.compute_loss(ids, ids).loss.backward()
    opt.step()
    held_grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    held_moments = sum(t.numel() * t.element_size() for state in opt.state.values() for t in state.values()
                       if torch.is_tensor(t) and t.numel() > 1)  # (the scalar step counters are not moments)
    assert grads == held_grads
    assert moment_bytes == held_moments
    assert moment_bytes == (2 if moments == "bf16" else 4) * 2 * sum(p.numel() for p in model.parameters())


def test_a_state_larger_than_the_gpu_is_refused_with_the_ways_to_fit():
    gib = mem.GIB
    mem.check_state_fits(10 * gib, 10 * gib, 20 * gib, None, "fp32")  # the CPU: no limit known
    mem.check_state_fits(10 * gib, 10 * gib, 20 * gib, 40 * gib, "fp32")  # exactly full still starts
    with pytest.raises(CoscaleError, match=r"need 40\.00 GiB before any activation, more than this GPU's 39\.0 GiB"
                                           r".*--adam-moments-dtype bf16 \(saves 10\.00 GiB\)"):
        mem.check_state_fits(10 * gib, 10 * gib, 20 * gib, 39 * gib, "fp32")
    with pytest.raises(CoscaleError) as info:
        mem.check_state_fits(10 * gib, 10 * gib, 10 * gib, 29 * gib, "bf16")
    assert "--adam-moments-dtype" not in str(info.value) and "--ep-size" in str(info.value)
    assert "--batch-size" not in str(info.value)  # the batch does not change the state


@pytest.mark.parametrize("moments", ["fp32", "bf16"])
def test_an_out_of_memory_error_becomes_one_message(moments):
    err = mem.out_of_memory_error(torch.OutOfMemoryError(TORCH_OOM), 7, "cpu", moments, 4 * mem.GIB)
    text = str(err)
    assert "\n" not in text
    assert text.startswith("out of memory at step 7 (CUDA out of memory. Tried to allocate 896.00 MiB)")
    assert "--batch-size or --seq-len" in text
    assert ("--adam-moments-dtype bf16 (saves 2.00 GiB)" in text) == (moments == "fp32")


def _one_error_line(capsys, argv, match):
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("coscale train: error: ") and match in err[0], err
    return err[0]


def test_coscale_train_reports_out_of_memory_in_one_line(tmp_path, capsys, monkeypatch):
    calls = []

    def runs_out(self, batch, lr):
        calls.append(lr)
        if len(calls) == 2:
            raise torch.OutOfMemoryError(TORCH_OOM)
        return real(self, batch, lr)

    real = loop.StepRunner.__call__
    monkeypatch.setattr(loop.StepRunner, "__call__", runs_out)
    line = _one_error_line(capsys, [*RUN, "--out", str(tmp_path / "run")], "out of memory at step 2")
    assert "Tried to allocate 896.00 MiB" in line and "--adam-moments-dtype bf16" in line


def test_coscale_train_refuses_a_state_beyond_the_gpu_before_its_first_step(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(loop, "device_total_bytes", lambda device: 1 << 20)  # a 1 MiB "GPU"
    monkeypatch.setattr(loop.StepRunner, "__call__", lambda *a: pytest.fail("a step ran"))
    _one_error_line(capsys, [*RUN, "--out", str(tmp_path / "run")], "before any activation, more than this GPU's")

"""coscale.train.loop: a short run learns, writes its outputs, and resumes bit for bit."""

import contextlib
import json
import os

import pytest
import torch

from coscale.config import get_preset
from coscale.errors import ConfigError
from coscale.train import checkpointing as ckpt
from coscale.train.config import TrainConfig, resolve_model_config
from coscale.train.loop import train
from coscale.train.metrics import read_metrics


def small_model():
    """`tiny` shrunk further: 2 layers (1 dense, 1 MoE with 8 experts) + MTP, ~0.1M parameters."""
    return get_preset(
        "tiny", num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=2,
        num_key_value_heads=2, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_group=2,
        topk_group=1,
    )


def small_config(out_dir, **changes) -> TrainConfig:
    base = dict(model=small_model(), batch_size=4, seq_len=32, steps=6, eval_interval=3, eval_batches=2,
                log_interval=3, save_interval=3, keep_checkpoints=0, out_dir=str(out_dir), progress=False,
                tensorboard=False, threads=1)
    return TrainConfig(**(base | changes))


def quiet(_message):
    pass


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(os.path.join(run_dir, "metrics.jsonl"))
            if r["type"] == "train"}


def test_resume_is_bitwise_identical(tmp_path):
    full = tmp_path / "full"
    train(small_config(full), log=quiet)  # 6 steps, checkpoints at 3 and 6
    resumed = tmp_path / "resumed"
    k_dir = os.path.join(full, "checkpoints", "step_00000003")
    train(small_config(resumed, resume=k_dir), log=quiet)  # steps 4..6 from the step-3 checkpoint

    full_losses, resumed_losses = _losses(full), _losses(resumed)
    assert sorted(resumed_losses) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed_losses[step] == full_losses[step]  # bitwise, not approximately
    a = ckpt.load_checkpoint(os.path.join(full, "checkpoints", "step_00000006"))
    b = ckpt.load_checkpoint(os.path.join(resumed, "checkpoints", "step_00000006"))
    assert a.model.keys() == b.model.keys()
    for name in a.model:
        assert torch.equal(a.model[name], b.model[name]), name
    assert any("e_score_correction_bias" in name for name in a.model)  # router biases travel too
    for sa, sb in zip(a.optimizer["state"].values(), b.optimizer["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    assert torch.equal(a.trainer["sampler"]["generator"], b.trainer["sampler"]["generator"])


def test_resume_in_place_truncates_metrics_and_bf16_moments(tmp_path):
    run = tmp_path / "run"
    train(small_config(run, adam_moments_dtype="bf16"), log=quiet)
    reference = _losses(run)
    step3 = os.path.join(run, "checkpoints", "step_00000003")
    summary = train(small_config(run, adam_moments_dtype="bf16", resume=step3), log=quiet)
    assert summary["steps_this_run"] == 3
    assert _losses(run) == reference  # the same 6 losses, once each
    state = ckpt.load_checkpoint(ckpt.resolve_checkpoint(str(run)))
    assert all(s["exp_avg"].dtype == torch.bfloat16 for s in state.optimizer["state"].values())


def test_short_run_learns_and_writes_outputs(tmp_path):
    cfg = small_config(tmp_path / "run", steps=40, batch_size=8, seq_len=64, eval_interval=20,
                       log_interval=10, save_interval=0, lr=1e-2)
    lines = []
    summary = train(cfg, log=lines.append)
    losses = _losses(cfg.out_dir)
    first, last = sum(losses[s] for s in range(1, 6)) / 5, sum(losses[s] for s in range(36, 41)) / 5
    assert last < first - 1.5, (first, last)
    assert summary["final_val_loss"] < summary["unigram_entropy_nats"] + 0.3
    for key in ("metrics", "plot", "checkpoint"):
        assert os.path.exists(summary[key]), key
    assert os.path.getsize(summary["plot"]) > 1000
    assert json.load(open(os.path.join(cfg.out_dir, "summary.json")))["steps"] == 40
    records = read_metrics(summary["metrics"])
    train_records = [r for r in records if r["type"] == "train"]
    assert {"loss", "lr", "tokens_per_s", "grad_norm", "mtp_loss", "moe_load_max_over_mean"} <= set(train_records[0])
    assert [r["step"] for r in records if r["type"] == "eval"] == [20, 40]
    assert any("unigram entropy" in line for line in lines)
    assert sorted(os.listdir(os.path.join(cfg.out_dir, "checkpoints"))) == ["latest", "step_00000040"]


def test_router_biases_move(tmp_path):
    cfg = small_config(tmp_path / "run", steps=3, save_interval=0, bias_update_speed=0.01)
    summary = train(cfg, log=quiet)
    state = ckpt.load_checkpoint(summary["checkpoint"])
    biases = [t for name, t in state.model.items() if name.endswith("e_score_correction_bias")]
    assert biases and any(b.abs().max() > 0 for b in biases)
    cfg = small_config(tmp_path / "off", steps=3, save_interval=0, bias_update_speed=0.0)
    state = ckpt.load_checkpoint(train(cfg, log=quiet)["checkpoint"])
    assert all(t.abs().max() == 0 for name, t in state.model.items() if name.endswith("e_score_correction_bias"))


def test_refuses_non_empty_run_dir_and_overwrite(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not empty"):
        train(small_config(run, steps=1), log=quiet)
    summary = train(small_config(run, steps=1, overwrite=True), log=quiet)
    assert (run / "notes.txt").read_text() == "keep me"  # --overwrite replaces only run outputs
    assert os.path.exists(summary["checkpoint"])


def test_config_validation_and_files(tmp_path):
    with pytest.raises(ConfigError, match="batch_size must be a positive integer"):
        TrainConfig(batch_size=0).validate()
    with pytest.raises(ConfigError, match="unknown training config field 'batch'"):
        TrainConfig.from_dict({"batch": 3})
    with pytest.raises(ConfigError, match="precision must be one of"):
        TrainConfig(precision="fp16").validate()
    path = tmp_path / "c.yaml"
    path.write_text("steps: 7\nmodel: tiny\nmodel_overrides: {num_hidden_layers: 2}\n")
    cfg = TrainConfig.from_file(str(path))
    assert cfg.steps == 7 and cfg.warmup == 0
    assert resolve_model_config(cfg).num_hidden_layers == 2
    with pytest.raises(ConfigError, match="unknown model config field 'layers'"):
        resolve_model_config(TrainConfig(model_overrides={"layers": 2}))
    with pytest.raises(ConfigError, match="seq_len 4096 exceeds"):
        train(TrainConfig(seq_len=4096, out_dir=str(tmp_path / "x")), log=quiet)
    assert not (tmp_path / "x").exists()


def test_fp8_precision(tmp_path):
    fp8 = pytest.importorskip("coscale.fp8")
    if not hasattr(fp8, "convert_to_fp8"):
        pytest.skip("coscale.fp8.convert_to_fp8 not available")
    try:
        summary = train(small_config(tmp_path / "run", steps=2, save_interval=0, precision="fp8"), log=quiet)
    except (RuntimeError, NotImplementedError) as e:  # no FP8 path for this CPU build
        pytest.skip(f"FP8 training unavailable here: {e}")
    assert summary["precision"] == "fp8" and summary["final_train_loss"] is not None


def test_fp8_header_says_what_speed_to_expect():
    from coscale.train.report import fp8_speed_note

    def note(precision, device, hidden):
        return fp8_speed_note(precision, torch.device(device), hidden)

    assert "PyTorch reference" in note("fp8", "cpu", 256)
    assert "do not beat BF16" in note("fp8", "cuda", 1024)
    assert note("fp8", "cuda", 7168) is None
    assert note("bf16", "cuda", 1024) is None and note("bf16", "cpu", 256) is None


def test_bf16_autocast_on_cpu(tmp_path):
    summary = train(small_config(tmp_path / "run", steps=2, save_interval=0, precision="bf16"), log=quiet)
    assert summary["precision"] == "bf16" and summary["final_val_loss"] is not None
    state = ckpt.load_checkpoint(summary["checkpoint"])
    assert all(t.dtype == torch.float32 for t in state.model.values())  # master weights stay FP32


def test_progress_bar_path(tmp_path, capsys):
    summary = train(small_config(tmp_path / "run", steps=2, save_interval=0, progress=True), log=quiet)
    assert summary["steps_this_run"] == 2
    assert "loss=" in capsys.readouterr().err  # tqdm postfix: loss, lr, tokens/s


# ---- the step: device tensors, read a step late ---------------------------------------------------------


def test_step_returns_device_tensors_without_a_host_sync(monkeypatch):
    """The trainer's own code in a step (coscale.train, the World) never reads a tensor on the host, so
    the step can run ahead of the device and be captured later. (On the CPU every tensor is a host
    tensor, so the check is on who asks: torch's own CPU bookkeeping and the model are not the trainer.)"""
    import sys

    from coscale.model import DeepseekForCausalLM
    from coscale.parallel.world import SingleProcess
    from coscale.train.optim import build_optimizer
    from coscale.train.step import LOSS_NAMES, train_step

    torch.manual_seed(0)
    model = DeepseekForCausalLM(small_model())
    optimizer = build_optimizer(model, lr=1e-3)
    batch = (torch.randint(0, 256, (2, 16)), torch.randint(0, 256, (2, 16)))
    trainer_modules = ("coscale.train.", "coscale.parallel.world", "coscale.parallel.training")

    def forbidden(name, real):
        def call(self, *args, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith(trainer_modules):
                raise AssertionError(f"host sync in the training step: Tensor.{name} called from {caller}")
            return real(self, *args, **kwargs)
        return call

    with monkeypatch.context() as patch:
        for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
            patch.setattr(torch.Tensor, name, forbidden(name, getattr(torch.Tensor, name)))
        metrics = train_step(model, optimizer, SingleProcess(torch.device("cpu")), batch, gamma=0.01,
                             grad_clip=1.0, autocast=contextlib.nullcontext)
    assert set(LOSS_NAMES) <= set(metrics) and "moe_load_max_over_mean" in metrics
    assert all(torch.is_tensor(v) and v.dim() == 0 for v in metrics.values())
    assert metrics["loss"] > 0 and metrics["grad_norm"] > 0


def test_readout_is_a_step_late_and_drains_everything():
    from coscale.train.readout import StepReadout

    readout = StepReadout(lag=1)
    readout.push(1, {"loss": torch.tensor(2.0), "total_loss": torch.tensor(2.5), "mtp_loss": torch.tensor(float("nan")),
                     "aux_loss": torch.tensor(0.1), "grad_norm": torch.tensor(3.0)})
    readout.note(1, lr=0.1, seconds=0.5)
    assert readout.ready() == []  # step 1 is the newest: not read yet
    readout.push(2, {"loss": torch.tensor(1.0), "total_loss": torch.tensor(1.5), "mtp_loss": torch.tensor(0.2),
                     "aux_loss": torch.tensor(0.0), "grad_norm": torch.tensor(float("nan")),
                     "moe_load_max_over_mean": torch.tensor(1.5), "moe_load_max_over_min": torch.tensor(4.0),
                     "moe_all_experts_loaded": torch.tensor(0.0), "moe_any_routed": torch.tensor(1.0)})
    (first,) = readout.ready()
    assert first.pop("peak_rss_gib") > 0  # every record carries the process's peak memory so far
    assert first == {"type": "train", "step": 1, "loss": 2.0, "total_loss": 2.5, "mtp_loss": None,
                     "aux_loss": pytest.approx(0.1), "grad_norm": 3.0, "lr": 0.1, "seconds": 0.5}
    (second,) = readout.drain()
    assert second["grad_norm"] is None and second["moe_load_max_over_mean"] == 1.5
    assert second["moe_load_max_over_min"] is None  # some expert got no token: max/min is undefined
    assert readout.drain() == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the pinned, non-blocking copy path needs CUDA")
def test_readout_from_the_gpu_matches_the_values():
    from coscale.train.readout import StepReadout
    from coscale.train.step import LOSS_NAMES

    readout = StepReadout(lag=1)
    values = {step: torch.rand(len(LOSS_NAMES), dtype=torch.float64).tolist() for step in (1, 2, 3)}
    for step, row in values.items():
        big = torch.randn(4096, 4096, device="cuda")  # keep the device busy while the copies are queued
        metrics = {name: torch.tensor(v, device="cuda") + 0 * big.sum() for name, v in zip(LOSS_NAMES, row)}
        readout.push(step, metrics)
    records = readout.ready() + readout.drain()
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert [r[name] for name in LOSS_NAMES] == pytest.approx(values[r["step"]], rel=1e-6)


def test_check_finite_names_the_step_and_the_last_checkpoint():
    from coscale.train.readout import TrainingDiverged, check_finite

    check_finite({"step": 3, "loss": 1.0, "total_loss": 1.2}, None)
    with pytest.raises(TrainingDiverged, match="training loss is inf at step 4; .*last checkpoint is ck"):
        check_finite({"step": 4, "loss": float("inf"), "total_loss": 1.0}, "ck")
    with pytest.raises(TrainingDiverged, match="total loss .* is nan at step 5"):
        check_finite({"step": 5, "loss": 1.0, "total_loss": None}, None)


# ---- --init-from: fine-tuning from HF-format weights ----------------------------------------------------


def test_init_from_starts_from_the_checkpoint_weights(tmp_path):
    from coscale.checkpoint import save_pretrained
    from coscale.model import DeepseekForCausalLM

    torch.manual_seed(123)  # not the run's seed: a random init would differ everywhere
    source = DeepseekForCausalLM(small_model())
    hf_dir = tmp_path / "hf"
    save_pretrained(source, hf_dir)
    lines = []
    cfg = small_config(tmp_path / "run", model=None, init_from=str(hf_dir), steps=1, save_interval=0, lr=1e-12,
                       min_lr=0.0, weight_decay=0.0)
    summary = train(cfg, log=lines.append)
    assert any(line.startswith(f"init: weights from {hf_dir}") for line in "\n".join(lines).splitlines())
    trained = ckpt.load_checkpoint(summary["checkpoint"]).model
    expected = source.state_dict()
    for name, tensor in trained.items():
        if name.endswith("e_score_correction_bias"):
            continue  # moved by the bias update (gamma * sign), not by the optimizer
        assert torch.allclose(tensor, expected[name], rtol=0, atol=1e-9), name


def test_model_directory_with_weights_says_it_trains_from_scratch(tmp_path):
    from coscale.checkpoint import save_pretrained
    from coscale.model import DeepseekForCausalLM

    hf_dir = tmp_path / "hf"
    save_pretrained(DeepseekForCausalLM(small_model()), hf_dir)
    lines = []
    train(small_config(tmp_path / "run", model=str(hf_dir), steps=1, save_interval=0), log=lines.append)
    notes = [line for line in "\n".join(lines).splitlines() if line.startswith("note: training starts from scratch")]
    assert len(notes) == 1 and f"--init-from {hf_dir}" in notes[0]

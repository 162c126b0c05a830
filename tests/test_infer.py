"""Generation over the latent cache and MTP speculative decoding."""

import pytest
import torch

from coscale import save_pretrained
from coscale.config import get_preset
from coscale.infer import generate, generate_speculative, speculative
from coscale.model import DeepseekForCausalLM


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = get_preset("tiny", num_hidden_layers=2, vocab_size=50)
    return DeepseekForCausalLM(cfg).double().eval()


def greedy_without_cache(model, prompt, n):
    seq = prompt
    for _ in range(n):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq


def test_cached_generation_equals_full_recompute(model):
    prompt = torch.randint(0, 50, (2, 5))
    assert torch.equal(generate(model, prompt, 12), greedy_without_cache(model, prompt, 12))


def test_speculative_equals_greedy_with_real_mtp(model):
    prompt = torch.randint(0, 50, (1, 6))
    out, stats = generate_speculative(model, prompt, 15)
    assert torch.equal(out, generate(model, prompt, 15))
    assert stats.tokens == 15 and stats.main_calls == len(stats.per_step_tokens)


def test_incremental_mtp_draft_equals_full_mtp_forward(model, monkeypatch):
    """The engine's MTP drafts (module 1 over the paged cache, fed a prompt chunk and then one step at a
    time) equal a full MTP forward over the final sequence at the same positions."""
    calls = []
    real_draft = speculative.draft_logits

    def record(model_, depth, h, positions):
        logits = real_draft(model_, depth, h, positions)
        calls.append((positions.tolist(), logits))
        return logits

    monkeypatch.setattr(speculative, "draft_logits", record)
    prompt = torch.randint(0, 50, (1, 5))
    out, _ = generate_speculative(model, prompt, 6)
    with torch.no_grad():
        full = model.mtp_logits(model.hidden_states(out), out)[0]  # position i predicts token i + 2
    assert len(calls) >= 3
    for positions, logits in calls:
        if positions[0] + 2 < out.shape[1]:
            torch.testing.assert_close(logits[0], full[0, positions[0]])


@pytest.mark.parametrize("oracle_every", [1, 2])
def test_accepted_drafts_commit_two_tokens(model, monkeypatch, oracle_every):
    """With a drafter that is right every `oracle_every`-th time, the output is still greedy."""
    prompt = torch.randint(0, 50, (1, 4))
    reference = generate(model, prompt, 16)
    calls = {"n": 0}
    real_draft = speculative.draft_logits

    def oracle(model_, depth, h, positions):
        logits = real_draft(model_, depth, h, positions)
        calls["n"] += 1
        # The draft is for the token at position positions + depth + 2 (0-based index in the sequence).
        target_index = int(positions[0]) + depth + 2
        if calls["n"] % oracle_every == 0 and target_index < reference.shape[1]:
            logits = torch.full_like(logits, -1e9)
            logits[0, reference[0, target_index]] = 0.0
        return logits

    monkeypatch.setattr(speculative, "draft_logits", oracle)
    out, stats = generate_speculative(model, prompt, 16)
    assert torch.equal(out, reference)
    assert stats.accepted > 0
    if oracle_every == 1:
        assert stats.main_calls <= 9  # 16 tokens in about 8 calls


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="non-empty"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="one sequence"):
        generate_speculative(model, torch.zeros(2, 3, dtype=torch.long), 3)
    no_mtp = DeepseekForCausalLM(get_preset("tiny", num_hidden_layers=1, num_nextn_predict_layers=0))
    with pytest.raises(ValueError, match="no MTP module"):
        generate_speculative(no_mtp, torch.zeros(1, 3, dtype=torch.long), 3)


def test_generate_cli_from_hf_checkpoint_and_training_run(tmp_path, capsys):
    from coscale.cli import main
    from coscale.train.loop import TrainConfig, train

    torch.manual_seed(0)
    cfg = get_preset("tiny", num_hidden_layers=2)
    save_pretrained(DeepseekForCausalLM(cfg), tmp_path / "hf")
    assert main(["generate", str(tmp_path / "hf"), "--prompt", "ab", "--max-new-tokens", "4"]) == 0
    assert main(["generate", str(tmp_path / "hf"), "--prompt-ids", "1,2", "--max-new-tokens", "3",
                 "--speculative"]) == 0
    train(TrainConfig(model="tiny", model_overrides={"num_hidden_layers": 1}, steps=2, batch_size=2,
                      seq_len=16, out_dir=str(tmp_path / "run"), progress=False, tensorboard=False,
                      eval_interval=0), log=lambda s: None)
    assert main(["generate", str(tmp_path / "run"), "--max-new-tokens", "4"]) == 0
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "missing")]) == 2
    assert main(["generate", str(tmp_path / "hf"), "--prompt-ids", "1,x"]) == 2
    assert main(["generate", str(tmp_path / "hf"), "--prompt-ids", "999"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("coscale generate: error:") for line in err)


@pytest.mark.parametrize("extra,msg", [
    (["--temperature", "nan"], "temperature"), (["--device", "foo"], "device"),
    (["--max-new-tokens", "5000"], "context length"),
])
def test_generate_cli_rejects_bad_options(tmp_path, capsys, extra, msg):
    from coscale.cli import main

    save_pretrained(DeepseekForCausalLM(get_preset("tiny", num_hidden_layers=1)), tmp_path / "hf")
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "hf"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and msg in err

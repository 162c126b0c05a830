"""User mistakes in the analysis inputs: each is one ConfigError (one line from the CLI), never a traceback,
a NaN in the output or an option silently ignored."""

import json

import pytest

from coscale.analysis import ep_limit, memory, network, search, serving, validation
from coscale.analysis.models import load_model
from coscale.analysis.serving import ServingLayout
from coscale.cli import main
from coscale.errors import ConfigError
from coscale.hardware import get_hardware, hardware_to_dict, load_hardware


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def refused(capsys, *argv, match=""):
    rc, _, err = run(capsys, "analyze", *argv)
    assert rc == 2 and err.count("\n") == 1 and match in err, err
    return err


# ---- files that are not UTF-8 text ---------------------------------------------------------------------

NOT_UTF8 = bytes([0x81, 0xFF, 0x00, 0x9C]) * 16


def test_hardware_file_not_utf8(tmp_path):
    path = tmp_path / "hw.yaml"
    path.write_bytes(NOT_UTF8)
    with pytest.raises(ConfigError, match=f"{path} is not UTF-8 text"):
        load_hardware(path)


def test_model_file_not_utf8(tmp_path):
    path = tmp_path / "config.json"
    path.write_bytes(NOT_UTF8)
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_model(path)


def test_measurements_and_run_files_not_utf8(tmp_path, capsys):
    path = tmp_path / "m.json"
    path.write_bytes(NOT_UTF8)
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        validation.load_measurements(path)
    refused(capsys, "validate", "--measurements", str(path), match="not UTF-8")


# ---- hardware files: infinite, NaN and fractional values ---------------------------------------------------

def _hw_file(tmp_path, text_extra: str = "", **fields):
    d = {k: v for k, v in hardware_to_dict(get_hardware("h200")).items() if k != "efficiency"}
    d.update(fields)
    lines = [f"{k}: {json.dumps(v)}" for k, v in d.items()]
    path = tmp_path / "gpu.yaml"
    path.write_text("\n".join(lines) + "\n" + text_extra)
    return path


@pytest.mark.parametrize("field", ["hbm_gb", "hbm_bandwidth_tbps", "bf16_tflops", "fp8_tflops",
                                   "scale_up_bandwidth_gbps", "nic_gbps", "nics_per_gpu"])
@pytest.mark.parametrize("value", [".inf", ".nan"])
def test_infinite_or_nan_peaks_refused(tmp_path, field, value):
    path = _hw_file(tmp_path)
    path.write_text(path.read_text().replace(f"{field}: ", f"{field}: {value} #"))
    with pytest.raises(ConfigError, match=f"{field} must be a positive finite number"):
        load_hardware(path)


@pytest.mark.parametrize("entry", ["memory_tbps: .nan", "memory_tbps: .inf", "kernel_floor_us: .inf",
                                   "gemm_fp8_tflops: {value: .nan}", "sustained_clock_ratio: .nan",
                                   "sms: .inf", "comm_sms: .nan"])
def test_infinite_or_nan_efficiencies_refused(tmp_path, entry):
    path = _hw_file(tmp_path, f"efficiency:\n  {entry}\n")
    with pytest.raises(ConfigError, match="finite number"):
        load_hardware(path)


def test_efficiency_values_that_json_spells_nan(tmp_path):
    d = hardware_to_dict(get_hardware("h200"))
    d["efficiency"]["memory_tbps"]["value"] = float("nan")
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps(d))  # json writes NaN, and reads it back
    with pytest.raises(ConfigError, match="memory_tbps must be a positive finite number"):
        load_hardware(path)


@pytest.mark.parametrize("entry", ["sms: 100.5", "comm_sms: 0.5"])
def test_fractional_sm_counts_refused(tmp_path, entry):
    with pytest.raises(ConfigError, match="whole number of SMs"):
        load_hardware(_hw_file(tmp_path, f"efficiency:\n  {entry}\n"))


def test_whole_float_sm_count_is_an_int(tmp_path):
    eff = load_hardware(_hw_file(tmp_path, "efficiency:\n  sms: 132.0\n")).achieved
    assert eff.sms == 132 and isinstance(eff.sms, int)


def test_yaml_exponent_without_a_dot_is_explained(tmp_path):
    with pytest.raises(ConfigError, match=r"YAML 1\.1 reads 1e9 as a string.*1\.0e\+9"):
        load_hardware(_hw_file(tmp_path, "efficiency:\n  kernel_floor_us: 1e9\n"))


def test_infinite_hardware_through_the_cli(tmp_path, capsys):
    path = _hw_file(tmp_path)
    path.write_text(path.read_text().replace("hbm_gb: ", "hbm_gb: .inf #"))
    for sub in (["kv-cache", "--model", "tiny"], ["memory", "--model", "tiny"], ["serve", "--model", "tiny",
                                                                                "--ep", "1"]):
        refused(capsys, *sub, "--hardware", str(path), match="hbm_gb must be a positive finite number")


# ---- models: dense HF configs ----------------------------------------------------------------------------

LLAMA = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 100}


@pytest.mark.parametrize("model_type", ["llama", "qwen"])
@pytest.mark.parametrize("change, match", [
    ({"num_attention_heads": 0}, "num_attention_heads must be a positive integer, got 0"),
    ({"hidden_size": "4096"}, "hidden_size must be a positive integer, got '4096'"),
    ({"hidden_size": 64.5}, "hidden_size must be a positive integer"),
    ({"num_attention_heads": "four"}, "num_attention_heads must be a positive integer"),
])
def test_dense_config_fields_divided_are_checked_first(tmp_path, model_type, change, match):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**LLAMA, "model_type": model_type, **change}))
    with pytest.raises(ConfigError, match=match):
        load_model(path)


# ---- analyze inference-limit -----------------------------------------------------------------------------

@pytest.mark.parametrize("argv, match", [
    (["--bandwidth", "inf"], "positive finite"), (["--sweep", "50,inf"], "positive finite"),
    (["--bandwidth", "nan"], "positive finite"),
    (["--sweep", "50,100", "--bandwidth", "999"], "leave out --bandwidth"),
    (["--paper-rounding", "--hidden", "1234"], "leave out --hidden"),
    (["--bandwidth", "100", "--link", "scale-up"], "--link"), (["--sweep", "100", "--link", "scale-out"], "--link"),
    (["--sweep", ""], "--sweep needs at least one number"),
])
def test_inference_limit_refuses(capsys, argv, match):
    refused(capsys, "inference-limit", *argv, match=match)


def test_comm_time_refuses_an_infinite_bandwidth():
    with pytest.raises(ConfigError, match="finite"):
        ep_limit.ep_comm_time(32, 9, 7000, float("inf"))


# ---- analyze memory --------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, match", [
    (["--inference", "--zero", "3"], "--zero describe(s) training memory"),
    (["--inference", "--seq-len", "99", "--micro-batch", "7", "--moments", "fp32", "--activation-coeff", "2",
      "--master", "none", "--weights", "fp8", "--grads", "bf16"], "leave out --inference"),
    (["--batch", "64"], "--batch describe(s) inference memory: add --inference"),
    (["--context", "100000", "--kv-dtype", "fp8", "--weight-dtype", "bf16"], "add --inference"),
    (["--activation-coeff", "nan"], "finite"), (["--activation-coeff", "inf"], "finite"),
    (["--redundant-experts", "-3"], "redundant experts (--redundant-experts) must be an integer >= 0, got -3"),
    (["--zero", "-1"], "ZeRO stage must be 0, 1, 2 or 3, got -1"),
])
def test_memory_refuses(capsys, argv, match):
    refused(capsys, "memory", "--model", "tiny", *argv, match=match)


def test_memory_modes_keep_their_options_and_defaults(capsys):
    rc, out, _ = run(capsys, "analyze", "memory", "--model", "tiny", "--inference", "--batch", "8", "--json")
    assert rc == 0 and "8 sequences" in out
    rc, out, _ = run(capsys, "analyze", "memory", "--model", "tiny", "--zero", "0", "--json")
    assert rc == 0 and "ZeRO-0" in out
    assert memory.memory_per_gpu("tiny").total > 0


# ---- analyze search and serve ----------------------------------------------------------------------------

@pytest.mark.parametrize("argv, match", [
    (["--context", "-5"], "context must be a positive integer"),  # refused whether or not the model fits
    (["--ep", "32", "--context", "-5"], "context must be a positive integer"),
    (["--mtp-drafts", "-1"], "MTP drafts"), (["--ep", "1", "--mtp-drafts", "-1"], "MTP drafts"),
    (["--mtp-drafts", "1", "--mtp-acceptance", "3"], "MTP acceptance"),
    (["--ep", "1", "--mtp-drafts", "1", "--mtp-acceptance", "3"], "MTP acceptance"),
    (["--gpus", "1", "--context", "0"], "context"),
    (["--ep", "32", "--mtp-acceptance", "0.9"], "give --mtp-drafts"),
    (["--tpot-ms", "inf"], "--tpot-ms must be a positive finite number"),
])
def test_search_refuses_up_front(capsys, argv, match):
    refused(capsys, "search", *argv, match=match)


def test_search_library_checks_before_memory():
    # EP 1 holds nothing of DeepSeek-V3: the bad values must still be errors, not "nothing fits"
    with pytest.raises(ConfigError, match="context"):
        search.max_decode_batch("deepseek-v3", "h800", ServingLayout(ep=1), -5)
    with pytest.raises(ConfigError, match="MTP acceptance"):
        search.max_decode_batch("deepseek-v3", "h800", ServingLayout(ep=1), 4096, mtp_drafts=1, mtp_acceptance=3)
    with pytest.raises(ConfigError, match="TPOT target"):
        search.best_layouts("deepseek-v3", "h800", 8, 4096, tpot_target_s=float("inf"))


@pytest.mark.parametrize("argv, match", [
    (["--mtp-drafts", "0", "--mtp-acceptance", "0.9"], "give --mtp-drafts"),
    (["--phase", "decode", "--mtp-acceptance", "0.9"], "give --mtp-drafts"),
    (["--phase", "prefill", "--prompt-len", "99999", "--tokens", "100"], "exceeds the tokens"),
    (["--deepseek-profile", "--model", "tiny"], "--deepseek-profile runs decode at EP128"),
    (["--deepseek-profile", "--model", "tiny", "--phase", "prefill"], "--deepseek-profile runs prefill at EP32"),
])
def test_serve_refuses(capsys, argv, match):
    refused(capsys, "serve", *argv, match=match)


def test_serve_profile_acceptance_with_its_draft_is_used(capsys):
    rc, out, _ = run(capsys, "analyze", "serve", "--deepseek-profile", "--phase", "decode", "--mtp-acceptance", "0.9")
    assert rc == 0 and "acceptance 0.9" in out


def test_prefill_library_refuses_a_prompt_longer_than_the_tokens():
    with pytest.raises(ConfigError, match="prompt length"):
        serving.prefill("tiny", "h200", ServingLayout(ep=1), tokens=100, prompt_len=200)


# ---- analyze training-time and network ---------------------------------------------------------------------

@pytest.mark.parametrize("argv, match", [
    (["--micro-batch", "0"], "micro-batch must be a positive integer, got 0"),
    (["--train-tokens", "inf"], "--train-tokens"), (["--price", "inf"], "--price"),
    (["--train-tokens", "nan"], "--train-tokens"),
])
def test_training_time_refuses(capsys, argv, match):
    refused(capsys, "training-time", "--model", "small", *argv, match=match)


@pytest.mark.parametrize("argv, match", [
    (["--cost", "switch_port=inf"], "cost switch_port must be a finite number >= 0, got inf"),
    (["--cost", "=5"], "no key before '='"),
])
def test_network_refuses(capsys, argv, match):
    refused(capsys, "network", *argv, match=match)


def test_network_cost_names_an_odd_key():
    with pytest.raises(ConfigError, match="unknown cost key.*' switch'"):
        network.CostModel().with_overrides({" switch": 1.0})


def test_error_prefix_names_the_subcommand(capsys):
    err = refused(capsys, "memory", "--zero", "-1")
    assert err.startswith("coscale analyze memory: error: ")


# ---- analyze validate ----------------------------------------------------------------------------------------

DECODE = {"kind": "decode_step", "model": "tiny", "batch": 4, "context": 128, "seconds": 0.01}
TRAIN = {"kind": "train_step", "model": "tiny", "batch": 2, "seq_len": 32, "seconds": 0.05}


@pytest.mark.parametrize("record, match", [
    ({**DECODE, "micro_batches": "abc"}, "'micro_batches' must be an integer"),
    ({**DECODE, "micro_batches": 0}, "'micro_batches' must be an integer >= 1"),
    ({**DECODE, "mtp_drafts": None}, "'mtp_drafts' must be an integer"),
    ({**DECODE, "mtp_drafts": 2.7}, "'mtp_drafts' must be an integer"),
    ({**DECODE, "mtp_drafts": -1}, "'mtp_drafts' must be an integer >= 0"),
    ({**DECODE, "hardware": 5}, "'hardware' must be a string"),
    ({**DECODE, "precision": 8}, "'precision' must be a string"),
    ({**TRAIN, "eager": "no"}, "'eager' must be true or false"),
    ({**TRAIN, "include_mtp": "no"}, "'include_mtp' must be true or false"),
    ({**TRAIN, "grad_clip": 1}, "'grad_clip' must be true or false"),
    ({**TRAIN, "clip_in_update": "no"}, "'clip_in_update' must be true or false"),
    ({**TRAIN, "master": "bf16"}, "'master' must be fp32"),
    ({**DECODE, "seconds": float("inf")}, "'seconds' must be a positive finite number"),
    ({**DECODE, "seconds": float("nan")}, "'seconds' must be a positive finite number"),
    ({**DECODE, "bogus_key": 1}, "unknown key(s) 'bogus_key'; a decode_step record holds kind, model"),
    ({**DECODE, "eager": True}, "unknown key(s) 'eager'"),  # not a setting of the decode model
    ({**TRAIN, "context": 5}, "unknown key(s) 'context'"),
])
def test_bad_measurement_records(tmp_path, capsys, record, match):
    with pytest.raises(ConfigError, match=match.replace("(", r"\(").replace(")", r"\)")):
        validation.validation_table([record])
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"measurements": [record]}))
    refused(capsys, "validate", "--measurements", str(path))


def test_good_records_with_every_setting(tmp_path):
    records = [{**TRAIN, "eager": False, "include_mtp": False, "grad_clip": True, "master": "fp32",
                "moments": "bf16", "precision": "bf16", "hardware": "h200", "source": "x"},
               {**DECODE, "micro_batches": 2, "mtp_drafts": 1, "precision": "bf16"},
               {"kind": "prefill_step", "model": "tiny", "tokens": 256, "prompt_len": 128, "seconds": 0.01}]
    assert len(validation.validation_table(records).rows) == 3


def test_empty_measurements_file(tmp_path, capsys):
    path = tmp_path / "m.json"
    path.write_text('{"measurements": []}')
    refused(capsys, "validate", "--measurements", str(path), match="holds no measurement records")


def test_hardware_without_from_run_is_refused(tmp_path, capsys):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"measurements": [DECODE]}))
    refused(capsys, "validate", "--measurements", str(path), "--hardware", "nonsense",
            match="--hardware applies to --from-run records only")


def _run_dir(tmp_path, run: dict, config: dict | None = None):
    (tmp_path / "train_config.json").write_text(json.dumps({"model": "small", "batch_size": 4, "seq_len": 256,
                                                            **(config or {})}))
    lines = [{"type": "run", **run}] + [{"type": "train", "step": i, "tokens_per_s": 1000.0} for i in range(1, 5)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return tmp_path


@pytest.mark.parametrize("run, match", [
    ({"device": "cpu", "precision": "fp32"}, "ran on 'cpu'"),
    ({}, "does not record"),
    ({"device": "cuda", "precision": "fp32"}, "precision is 'fp32'"),
    ({"device": "cuda:0", "precision": "bf16", "parallel": {"world_size": 2}}, "several processes"),
])
def test_runs_that_cannot_be_modelled_are_refused(tmp_path, capsys, run, match):
    with pytest.raises(ConfigError, match=match):
        validation.record_from_run(_run_dir(tmp_path, run), "h200")
    refused(capsys, "validate", "--from-run", str(tmp_path), match=match)


def test_run_record_names_the_preset_and_the_step_mode(tmp_path):
    from coscale.config import get_preset

    config = {"model": get_preset("tiny").to_dict()}
    record = validation.record_from_run(_run_dir(tmp_path, {"device": "cuda:0", "precision": "bf16",
                                                            "model_name": "tiny"}, config), "h200")
    assert record["model"] == "tiny" and record["eager"] is False  # one CUDA process graphs its step
    record = validation.record_from_run(_run_dir(tmp_path, {"device": "cuda:0", "precision": "fp8",
                                                            "model_name": "small"},
                                                 {**config, "cuda_graphs": False}), "h200")
    assert isinstance(record["model"], dict) and record["eager"] is True and record["precision"] == "fp8"
    assert validation.predict(record) > 0

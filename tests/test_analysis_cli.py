"""`coscale analyze ...` and `coscale report` through coscale.cli.main, and the no-torch import rule."""

import json
import subprocess
import sys

import pytest

from coscale.cli import main


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("sub", [["kv-cache"], ["flops"], ["memory", "--dp", "128", "--pp", "16", "--ep", "64"],
                                 ["memory", "--inference", "--batch", "8"], ["inference-limit"],
                                 ["network", "--target", "20000"]])
def test_json_and_markdown(capsys, sub):
    rc, out, _ = run(capsys, "analyze", *sub, "--json")
    assert rc == 0
    tables = json.loads(out)["tables"]
    assert tables and all(t["rows"] for t in tables)
    rc, out, _ = run(capsys, "analyze", *sub, "--markdown")
    assert rc == 0 and out.startswith("### ") and "|---|" in out
    rc, out, _ = run(capsys, "analyze", *sub)
    assert rc == 0 and "====" in out


def test_kv_cache_json_numbers(capsys):
    rc, out, _ = run(capsys, "analyze", "kv-cache", "--model", "deepseek-v3", "--model", "qwen2.5-72b", "--json")
    rows = json.loads(out)["tables"][0]["rows"]
    assert [r["KB per token"] for r in rows] == [70.272, 327.68]


def test_inference_limit_options(capsys, tmp_path):
    rc, out, _ = run(capsys, "analyze", "inference-limit", "--paper-rounding", "--hardware", "h800", "--json")
    row = json.loads(out)["tables"][0]["rows"][0]
    assert round(row["TPOT [ms]"], 2) == 14.76
    plot = tmp_path / "tpot.png"
    rc, out, _ = run(capsys, "analyze", "inference-limit", "--sweep", "25,50,100", "--plot", str(plot))
    assert rc == 0 and plot.stat().st_size > 0 and "100 GB/s" in out


def test_network_cost_override(capsys):
    rc, out, _ = run(capsys, "analyze", "network", "--cost", "switch_port=0", "--json")
    ft2 = json.loads(out)["tables"][0]["rows"][0]
    assert ft2["topology"] == "FT2" and ft2["paper [M$]"] is None


@pytest.mark.parametrize("argv", [
    ["analyze", "kv-cache", "--model", "no-such-model"],
    ["analyze", "inference-limit", "--hardware", "no-such-gpu"],
    ["analyze", "inference-limit", "--bandwidth", "0"],
    ["analyze", "inference-limit", "--bandwidth", "-50"],
    ["analyze", "inference-limit", "--sweep", "10,abc"],
    ["analyze", "memory", "--dp", "4", "--ep", "3"],
    ["analyze", "memory", "--pp", "1000"],
    ["analyze", "network", "--radix", "7"],
    ["analyze", "network", "--cost", "gold=3"],
    ["analyze", "network", "--cost", "switch_port"],
])
def test_bad_input_one_line_exit_2(capsys, argv):
    rc, _, err = run(capsys, *argv)
    assert rc == 2
    assert err.count("\n") == 1 and "error:" in err


def test_malformed_hardware_yaml(capsys, tmp_path):
    path = tmp_path / "gpu.yaml"
    path.write_text("hbm_gb: [80\n")
    rc, _, err = run(capsys, "analyze", "inference-limit", "--hardware", str(path))
    assert rc == 2 and err.count("\n") == 1 and "YAML" in err


def test_report_markdown_and_html(capsys, tmp_path):
    rc, out, _ = run(capsys, "report", "--output", str(tmp_path / "md"))
    assert rc == 0
    text = (tmp_path / "md" / "report.md").read_text()
    for needle in ("70.272", "| 250 | 250 |", "14.76", "| DF | 261,632 | 16,352 | 384,272 | 1522 |"):
        assert needle in text
    for png in ("kv_cache.png", "tpot_vs_bandwidth.png", "network_cost.png"):
        assert (tmp_path / "md" / png).stat().st_size > 0 and png in text
    rc, _, _ = run(capsys, "report", "--output", str(tmp_path / "html"), "--html", "--no-charts",
                   "--model", "llama3.1-70b", "--hardware", "b200")
    assert rc == 0 and "<table>" in (tmp_path / "html" / "report.html").read_text()


def test_analysis_imports_no_torch():
    code = ("import sys, coscale.analysis, coscale.analysis.commands, coscale.hardware; "
            "coscale.analysis.report_tables(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_report_tables_for_every_preset_pair():
    from coscale.analysis import report_tables
    from coscale.analysis.models import model_names
    from coscale.hardware import hardware_names

    for model in model_names():
        for hardware in hardware_names():
            assert report_tables(model, hardware)


def _rows(out):
    return json.loads(out)["tables"][0]


def test_inference_limit_without_options_is_the_papers_table(capsys):
    rc, out, _ = run(capsys, "analyze", "inference-limit", "--json")
    table = _rows(out)
    assert rc == 0 and "paper" in table["title"] and len(table["rows"]) == 4
    ib, nvl72 = table["rows"][0], table["rows"][1]
    assert round(ib["comm TPOT [ms]"], 2) == 14.76 and ib["tokens"] == 32 and ib["binding"] == "communication"
    assert round(nvl72["comm TPOT [ms]"], 2) == 0.82
    # GB200: the binding bound and its TPOT sit side by side (the HBM bound, not the 0.82 ms of communication).
    assert nvl72["binding"] == "memory" and nvl72["TPOT [ms]"] == nvl72["memory TPOT [ms]"] > 5


@pytest.mark.parametrize("option, value, column, expected", [
    ("--tokens-per-device", "64", "tokens", 64),
    ("--micro-batches", "3", "layer [us]", None),
    ("--context", "8192", "memory TPOT [ms]", None),
    ("--link", "scale-up", "GB/s", 200.0),
])
def test_inference_limit_options_are_used(capsys, option, value, column, expected):
    _, base, _ = run(capsys, "analyze", "inference-limit", "--json")
    rc, out, _ = run(capsys, "analyze", "inference-limit", option, value, "--json")
    table = _rows(out)
    assert rc == 0 and "paper" not in table["title"] and len(table["rows"]) == 1
    row, paper_row = table["rows"][0], _rows(base)["rows"][2]  # the real-hidden H800 case
    if expected is not None:
        assert row[column] == expected
    else:
        assert row[column] > paper_row[column]


@pytest.mark.parametrize("argv", [["--tokens-per-device", "0"], ["--context", "-1"], ["--micro-batches", "0"],
                                  ["--tokens-per-device", "-5"], ["--context", "0"]])
def test_inference_limit_refuses_nonsense(capsys, argv):
    rc, _, err = run(capsys, "analyze", "inference-limit", *argv)
    assert rc == 2 and err.count("\n") == 1 and "must be a positive integer" in err


@pytest.mark.parametrize("path", ["/dev/null/x", "/proc/coscale-report"])
def test_report_to_an_unwritable_path(capsys, path):
    rc, out, err = run(capsys, "report", "--output", path, "--no-charts")
    assert rc == 2 and out == "" and err.count("\n") == 1 and path in err and "cannot write" in err


def test_report_on_a_read_only_filesystem_writes_nothing(capsys, tmp_path, monkeypatch):
    import errno
    import os

    real = os.replace

    def refuse(src, dst):
        if str(dst).endswith(".png"):
            raise OSError(errno.EROFS, "Read-only file system", str(src))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", refuse)
    out_dir = tmp_path / "rep"
    rc, _, err = run(capsys, "report", "--output", str(out_dir))
    assert rc == 2 and err.count("\n") == 1 and "Read-only file system" in err and str(out_dir) in err
    assert list(out_dir.iterdir()) == []  # no report.md, no PNG, no staging directory left


def test_missing_matplotlib_is_one_line(capsys, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    rc, _, err = run(capsys, "report", "--output", str(tmp_path / "r"))
    assert rc == 2 and err.count("\n") == 1 and "matplotlib" in err and "--no-charts" in err
    assert not (tmp_path / "r" / "report.md").exists()
    rc, _, err = run(capsys, "analyze", "inference-limit", "--plot", str(tmp_path / "t.png"))
    assert rc == 2 and err.count("\n") == 1 and "matplotlib" in err
    rc, _, _ = run(capsys, "report", "--output", str(tmp_path / "r"), "--no-charts")
    assert rc == 0 and (tmp_path / "r" / "report.md").exists()


def test_help_texts(capsys):
    from coscale.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    report = " ".join(sub["report"].format_help().split())
    assert "reproduce the paper's analysis" in report and "h800, h100, h200, b200, gb200-nvl72" in report
    analyze = next(a for a in sub["analyze"]._actions if a.dest == "analysis").choices
    for name, p in analyze.items():
        text = " ".join(p.format_help().split())
        assert "--json" in text and "print JSON" in text and "print Markdown tables" in text, name
        if name != "network":
            assert "gb200-nvl72" in text, name


def test_flops_json_names_the_activated_convention(capsys):
    rc, out, _ = run(capsys, "analyze", "flops", "--model", "deepseek-v3", "--json")
    table = _rows(out)
    row = table["rows"][0]
    assert any("embedding table excluded" in note for note in table["notes"])
    assert row["activated incl. embedding [B]"] - row["activated params [B]"] == pytest.approx(129280 * 7168 / 1e9)


@pytest.mark.parametrize("argv", [
    ["serve", "--deepseek-profile", "--breakdown"],
    ["serve", "--phase", "decode", "--ep", "72", "--redundant-experts", "32", "--mtp-drafts", "1",
     "--mtp-acceptance", "0.8"],
    ["search", "--gpus", "64", "--tpot-ms", "50"],
    ["search", "--ep", "128"],
    ["training-time", "--deepseek-v3"],
    ["training-time", "--model", "deepseek-v2-lite", "--dp", "8", "--ep", "8", "--hardware", "h100"],
    ["training-time", "--model", "small", "--no-grad-clip"],
])
def test_throughput_commands(capsys, argv):
    rc, out, _ = run(capsys, "analyze", *argv, "--json")
    assert rc == 0
    tables = json.loads(out)["tables"]
    assert tables and all(t["rows"] for t in tables)


def test_serve_profile_prints_the_published_figures(capsys):
    rc, out, _ = run(capsys, "analyze", "serve", "--deepseek-profile", "--json")
    rows = _rows(out)["rows"]
    assert [round(r["published tokens/s"]) for r in rows] == [2325, 7839]
    assert abs(rows[0]["vs published [%]"]) < 15
    rc, out, _ = run(capsys, "analyze", "serve", "--deepseek-profile", "--batch", "64", "--json")
    assert _rows(out)["rows"][0]["published tokens/s"] is None  # a changed setup is not the profile


@pytest.mark.parametrize("argv", [
    ["serve", "--ep", "0"], ["serve", "--batch", "0"], ["serve", "--mtp-acceptance", "2", "--mtp-drafts", "1"],
    ["search", "--gpus", "8", "--ep", "8"], ["training-time", "--deepseek-v3", "--model", "small"],
    ["serve", "--phase", "decode", "--tokens", "4096"], ["serve", "--phase", "prefill", "--batch", "8"],
    ["training-time", "--seq-len", "0"], ["validate"], ["serve", "--phase", "decode", "--kernels-per-step", "0"],
    ["serve", "--phase", "prefill", "--kernels-per-step", "900"],
])
def test_throughput_commands_refuse_bad_input(capsys, argv):
    rc, _, err = run(capsys, "analyze", *argv)
    assert rc == 2 and err.count("\n") == 1


def test_serve_counts_a_stacks_kernels(capsys):
    argv = ["analyze", "serve", "--phase", "decode", "--model", "deepseek-v2-lite", "--ep", "1", "--micro-batches", "1",
            "--batch", "16", "--json"]
    _, out, _ = run(capsys, *argv)
    _, counted, _ = run(capsys, *argv, "--kernels-per-step", "1200")
    assert _rows(counted)["rows"][0]["step [ms]"] > _rows(out)["rows"][0]["step [ms]"]


def test_validate_command(capsys, tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"measurements": [{"kind": "decode_step", "model": "deepseek-v2-lite",
                                                  "batch": 4, "context": 256, "seconds": 0.01}]}))
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- validation:begin -->\n<!-- validation:end -->\n")
    rc, out, _ = run(capsys, "analyze", "validate", "--measurements", str(path), "--update-doc", str(doc))
    assert rc == 0 and "decode_step" in out and "| decode_step |" in doc.read_text()


def test_training_time_charges_gradient_clipping_unless_told_not_to(capsys):
    parts = {}
    for flag in ([], ["--no-grad-clip"]):
        rc, out, _ = run(capsys, "analyze", "training-time", "--model", "small", *flag, "--json")
        assert rc == 0
        parts[bool(flag)] = [row["part"] for row in json.loads(out)["tables"][0]["rows"]]
    assert "gradient clipping" in parts[False] and "gradient clipping" not in parts[True]

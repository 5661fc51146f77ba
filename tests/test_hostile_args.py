"""Bad input to every command: one line naming the value and the fix, the right exit code, and nothing expensive
run first (issue 13: config field types, --device mistakes, eval --compare, vram on checkpoints and in seconds,
arguments checked before loading, NaN weights and huge temperatures, messages that misdiagnose)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanovlm_cli import evaluation
from nanovlm_cli.checkpoint.files import weight_files
from nanovlm_cli.checkpoint.io import build_model, save_model
from nanovlm_cli.cli import app as app_module
from nanovlm_cli.config import LanguageConfig, TrainConfig, VLMConfig
from nanovlm_cli.errors import CheckpointError, ConfigError, DataError
from nanovlm_cli.evaluation import compare_results, summarise, write_results
from nanovlm_cli.memory import sweep
from nanovlm_cli.presets import get_preset
from nanovlm_cli.run_config import resolve_run_config
from nanovlm_cli.validation import validate_checkpoint
from tests.helpers import solid_image

GIB = 1024**3


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run the real app in-process: (exit code, stdout, stderr)."""
    monkeypatch.delenv("NANOVLM_DEBUG", raising=False)

    def invoke(*args: str):
        capsys.readouterr()
        code = app_module.run([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return invoke


def one_error_line(err: str) -> str:
    """The single `error: ...` line of a failed command (and no traceback)."""
    assert "Traceback" not in err and "internal error" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model(get_preset("tiny").model, load_backbones=False)


@pytest.fixture(scope="module")
def ckpt(tiny, tmp_path_factory):
    return save_model(tiny.model, tmp_path_factory.mktemp("hostile") / "ckpt", tokenizer=tiny.tokenizer)


@pytest.fixture
def copy(ckpt, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(ckpt, target)
    return target


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "red.png"
    solid_image().save(path)
    return path


# --- 2: every config is checked against its field types --------------------------------------------------------


@pytest.mark.parametrize(("line", "field", "expected"), [
    ('freeze_vision_encoder = "false"', "freeze_vision_encoder", "true or false"),
    ("batch_size = 4.7", "batch_size", "a whole number"),
    ('max_steps = "five"', "max_steps", "a whole number"),
    ('lr_mp = "1e-3"', "lr_mp", "a number"),
    ('[model.language]\nhidden_dim = "big"', "model.language.hidden_dim", "a whole number"),
])
def test_config_file_values_of_the_wrong_type_are_refused_naming_field_value_and_type(tmp_path, line, field,
                                                                                      expected):
    path = tmp_path / "run.toml"
    path.write_text(line + "\n")
    with pytest.raises(ConfigError) as info:
        resolve_run_config("tiny", config_file=str(path))
    message = str(info.value)
    value = line.rpartition("= ")[2]
    assert f"{field} = {value}" in message and f"expected {expected}" in message and str(path) in message
    assert "\n" not in message


def test_string_false_in_a_config_file_never_freezes_the_vision_encoder(tmp_path, cli):
    path = tmp_path / "run.toml"
    path.write_text('freeze_vision_encoder = "false"\n')
    code, out, err = cli("train", "--preset", "tiny", "--config", path, "--dry-run", "--json")
    assert code == 1 and not out
    assert "write false without quotes" in one_error_line(err)
    path.write_text("freeze_vision_encoder = false\nbatch_size = 4.0\nlr_mp = 1\n")  # the right spellings work
    code, out, _ = cli("train", "--preset", "tiny", "--config", path, "--dry-run", "--json")
    train = json.loads(out)["train"]
    assert code == 0 and train["freeze_vision_encoder"] is False and train["batch_size"] == 4
    assert isinstance(train["lr_mp"], float)


def test_saved_run_config_and_checkpoint_configs_are_type_checked():
    saved = {**TrainConfig().to_dict(), "batch_size": "8"}  # a run_config.json edited by hand
    with pytest.raises(ConfigError, match=r'train.batch_size = "8" is a string, expected a whole number'):
        TrainConfig.from_dict(saved)
    with pytest.raises(ConfigError, match=r"language.tie_embeddings = 1 is an integer, expected true or false"):
        LanguageConfig(tie_embeddings=1)
    with pytest.raises(ConfigError, match="vision = .* expected a table of VisionConfig fields"):
        VLMConfig.from_dict({"vision": "siglip"})


def test_checkpoint_config_with_a_string_size_fails_generate_and_validate_in_one_line(copy, picture, cli):
    config = json.loads((copy / "config.json").read_text())
    config["model"]["language"]["hidden_dim"] = "big"
    (copy / "config.json").write_text(json.dumps(config))
    code, _, err = cli("generate", picture, "What is it?", "-c", copy, "--device", "cpu")
    assert code == 1 and 'language.hidden_dim = "big" is a string, expected a whole number' in one_error_line(err)
    check = next(c for c in validate_checkpoint(copy, generate=False).checks if c.name == "config")
    assert not check.ok and check.detail.startswith('config.json: model.language.hidden_dim = "big"')


# --- 4: --device mistakes --------------------------------------------------------------------------------------


@pytest.fixture
def cpu_only(monkeypatch):
    """This machine as a CPU-only one, whatever it really has."""
    # torch._dynamo reads torch.backends.mps.is_available.__wrapped__ when it is first imported (the vram estimate
    # path imports it lazily): import it before the plain-lambda patch, or a test run on its own fails there.
    import torch._dynamo

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.mark.parametrize("device", ["cuda", "cuda:1", "mps", "banana"])
@pytest.mark.parametrize("command", ["generate", "eval", "train"])
def test_device_mistakes_give_one_line_and_exit_2_or_1(cpu_only, ckpt, picture, tmp_path, cli, command, device):
    args = {"generate": ["generate", picture, "What is it?", "-c", ckpt],
            "eval": ["eval", ckpt, "--benchmark", "shapes", "--limit", "2"],
            "train": ["train", "--preset", "tiny", "--max-steps", "1", "--output-dir", tmp_path]}[command]
    code, _, err = cli(*args, "--device", device)
    line = one_error_line(err)
    assert code == (2 if device == "banana" else 1)
    assert device in line and ("--device cpu" in line or "use auto, cpu" in line)
    assert not any(tmp_path.iterdir())  # nothing was trained or written


def test_resolve_device_names_the_gpus_this_machine_has(monkeypatch):
    from nanovlm_cli.distributed import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"1 CUDA GPU\(s\), cuda:0 to cuda:0"):
        resolve_device("cuda:1")
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    assert resolve_device("cpu") == torch.device("cpu")


# --- 6: eval --compare compares the shared samples of the same benchmark and protocol ---------------------------


def _records(n, wrong=(), question="Q{}"):
    return [{"index": i, "question": question.format(i), "correct": i not in wrong, "category": "x",
             "extracted": "A"} for i in range(n)]


def test_compare_uses_only_the_samples_both_runs_scored(tmp_path):
    # The same model at --limit 50 (earlier) and --limit 10 (now): the first ten answers are the same.
    write_results(summarise("shapes", _records(50, wrong=range(10, 40))), tmp_path / "limit50")
    now = compare_results(summarise("shapes", _records(10)), tmp_path / "limit50")
    c = now.comparison
    assert c.n_common == 10 and c.delta == 0.0 and c.fixed == [] and c.broken == []
    assert c.accuracy == c.other_accuracy == 1.0 and c.n_other == 50


def test_compare_joins_on_the_question_not_only_the_index(tmp_path):
    write_results(summarise("shapes", _records(4, question="other split {}")), tmp_path / "before")
    with pytest.raises(DataError, match="no sample of this run"):
        compare_results(summarise("shapes", _records(4)), tmp_path / "before")


@pytest.mark.parametrize(("earlier_benchmark", "scoring", "message"), [
    ("mmstar", "generate", "scored benchmark 'mmstar', this run 'shapes'"),
    ("shapes", "rank", "--scoring rank, this run with --scoring generate"),
])
def test_compare_refuses_another_benchmark_or_scoring_protocol(tmp_path, earlier_benchmark, scoring, message):
    write_results(summarise(earlier_benchmark, _records(4), scoring=scoring), tmp_path / "before")
    with pytest.raises(DataError, match=message):
        compare_results(summarise("shapes", _records(4)), tmp_path / "before")


# --- 9: vram on a checkpoint uses the checkpoint's own context ---------------------------------------------------


def test_vram_of_a_checkpoint_with_a_short_context_measures_rows_that_fit(tmp_path, cli):
    cfg = get_preset("tiny").model
    cfg = cfg.replace(language=cfg.language.replace(max_position_embeddings=96))
    torch.manual_seed(0)
    loaded = build_model(cfg, load_backbones=False)
    short = save_model(loaded.model, tmp_path / "short", tokenizer=loaded.tokenizer)
    code, out, err = cli("vram", "--checkpoint", short, "--batch-sizes", "1", "--device", "cpu", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["seq_len"] == 96 and report["rows"][0]["measured_peak_bytes"] > 0
    code, _, err = cli("vram", "--checkpoint", short, "--batch-sizes", "1", "--seq-len", "200", "--device", "cpu")
    assert code == 1 and "--seq-len 200 is longer than the checkpoint" in one_error_line(err)


# --- 10: every argument is checked before a model loads -----------------------------------------------------------


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the command gets as far as evaluating or measuring anything."""
    def refuse(*args, **kwargs):
        raise AssertionError("the argument error was found only after the expensive work started")

    monkeypatch.setattr(evaluation, "evaluate_checkpoint", refuse)
    monkeypatch.setattr(sweep, "measure_vram", refuse)
    import nanovlm_cli.memory

    monkeypatch.setattr(nanovlm_cli.memory, "measure_vram", refuse)


def test_eval_arguments_are_checked_before_the_model_loads(no_model, ckpt, picture, tmp_path, cli):
    not_json = tmp_path / "notes.json"
    not_json.write_text("these are notes\n")
    cases = [
        (["--compare", tmp_path / "nope.json"], "--compare", "does not exist"),
        (["--compare", not_json], "--compare", "is not valid JSON"),
        (["--compare", picture], "--compare", "is not valid JSON"),
        (["--output", picture], "--output", "is an existing file, not a directory"),
        (["--output", picture / "results"], "--output", "which is a file"),
    ]
    for extra, option, message in cases:
        code, _, err = cli("eval", ckpt, "--benchmark", "shapes", "--device", "cpu", *extra)
        line = one_error_line(err)
        assert code == 2 and option in line and message in line, (extra, line)


def test_vram_plot_without_matplotlib_fails_before_measuring(no_model, monkeypatch, tmp_path, cli):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    code, _, err = cli("vram", "--preset", "tiny", "--batch-sizes", "1", "--plot", tmp_path / "m.png")
    line = one_error_line(err)
    assert code == 2 and "--plot needs matplotlib" in line and "pip install" in line


# --- 11: NaN weights, huge temperatures, output paths -------------------------------------------------------------


def test_nan_weights_give_a_clear_generate_error_not_a_torch_traceback(copy, picture, cli):
    state = load_file(str(copy / "model.safetensors"))
    state["language.embed_tokens.weight"][:] = float("nan")
    save_file(state, str(copy / "model.safetensors"))
    for sampling in (["--temperature", "0.7"], ["--greedy"]):
        code, out, err = cli("generate", picture, "What is it?", "-c", copy, "--device", "cpu", *sampling)
        line = one_error_line(err)
        assert code == 1 and not out.strip() and "NaN or infinite" in line and "nanovlm validate" in line


def test_huge_temperature_samples_and_infinite_temperature_is_refused(ckpt, picture, cli):
    code, out, err = cli("generate", picture, "What is it?", "-c", ckpt, "--device", "cpu", "--temperature", "1e308",
                         "--max-new-tokens", "4", "--json")
    assert code == 0, err
    assert json.loads(out)["new_tokens"][0] >= 1
    code, _, err = cli("generate", picture, "What is it?", "-c", ckpt, "--device", "cpu", "--temperature", "inf")
    assert code == 1 and "temperature=inf must be a finite number" in one_error_line(err)


def test_train_output_dir_below_a_file_and_escaping_run_names_are_refused(picture, tmp_path, cli):
    code, _, err = cli("train", "--preset", "tiny", "--max-steps", "1", "--output-dir", picture / "runs")
    assert code == 2 and "--output-dir" in one_error_line(err) and "which is a file" in one_error_line(err)
    out_dir = tmp_path / "a" / "b"
    code, _, err = cli("train", "--preset", "tiny", "--max-steps", "1", "--output-dir", out_dir,
                       "--run-name", "../../x")
    assert code == 1 and "is not a plain name" in one_error_line(err)
    assert not (tmp_path / "x").exists() and not out_dir.exists()


# --- 14: messages that say what is really wrong ------------------------------------------------------------------


def test_a_deleted_model_safetensors_is_reported_missing_not_pickled(copy, picture, cli):
    (copy / "model.safetensors").unlink()
    (copy / "training_state.pt").write_bytes(b"optimizer state, not weights")
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        weight_files(copy)
    code, _, err = cli("generate", picture, "What is it?", "-c", copy, "--device", "cpu")
    line = one_error_line(err)
    assert code == 1 and "model.safetensors is missing" in line and "pickled" not in line
    (copy / "pytorch_model.bin").write_bytes(b"pickled weights")
    with pytest.raises(CheckpointError, match=r"only pickled weights \(pytorch_model.bin\)"):
        weight_files(copy)


def test_a_checkpoint_url_or_a_config_that_is_not_an_object_is_named(no_model, copy, picture, cli):
    url = "https://huggingface.co/lusxvr/nanoVLM-450M/tree/main"
    code, _, err = cli("generate", picture, "What is it?", "-c", url, "--device", "cpu")
    assert code == 1 and "is a URL; pass the repo id 'lusxvr/nanoVLM-450M'" in one_error_line(err)
    (copy / "config.json").write_text("[1, 2]")
    code, _, err = cli("generate", picture, "What is it?", "-c", copy, "--device", "cpu")
    assert code == 1 and "holds a JSON list, not an object" in one_error_line(err)


def test_validate_passes_a_checkpoint_without_a_stored_chat_template(copy):
    (copy / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((copy / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    report = validate_checkpoint(copy, generate=False)
    tokenizer = next(c for c in report.checks if c.name == "tokenizer")
    assert report.ok and tokenizer.ok and "from the config" in tokenizer.detail


@pytest.mark.parametrize(("image", "message"), [
    ("https://example.com/cat.png", "https://example.com/cat.png is a URL; images are read from local files"),
    ("DIR", "is a directory; pass an image file"),
])
def test_a_url_or_a_directory_as_the_image_says_what_is_accepted(no_model, ckpt, tmp_path, cli, image, message):
    image = tmp_path if image == "DIR" else image
    code, _, err = cli("generate", image, "What is it?", "-c", ckpt, "--device", "cpu")
    assert code == 1 and message in one_error_line(err)


def test_open_answer_eval_reports_empty_replies_not_missing_options(monkeypatch, ckpt, cli):
    records = [{"index": i, "question": "What colour?", "prediction": "", "extracted": None if i < 2 else "red",
                "answer": "red", "correct": i >= 2, "category": "colour"} for i in range(4)]
    monkeypatch.setattr(evaluation, "evaluate_checkpoint", lambda *a, **k: summarise("shapes-open", records))
    code, out, err = cli("eval", ckpt, "--benchmark", "shapes-open", "--device", "cpu")
    assert code == 0, err
    assert "2 of 4 replies were empty" in out and "named no option" not in out


def test_one_generated_token_is_reported_in_the_singular(monkeypatch, ckpt):
    from nanovlm_cli import generation

    def one_token(self, prompts, sampling, on_text=None):
        return generation.GenerationResult(["A"], [[1]], [1], [1], 0.0, 0.0, 0.0, ["eos"])

    monkeypatch.setattr(generation.Engine, "generate", one_token)
    detail = next(c for c in validate_checkpoint(ckpt, device="cpu").checks if c.name == "generation").detail
    assert detail.startswith("1 token in ")


@pytest.mark.parametrize(("args", "option"), [
    (["train", "--preset", "tiny", "--batch-size", "0"], "--batch-size"),
    (["train", "--preset", "tiny", "--max-steps", "0"], "--max-steps"),
    (["vram", "--preset", "tiny", "--max-batch-size-for", "-3"], "--max-batch-size-for"),
    (["vram", "--preset", "tiny", "--batch-sizes", "two"], "--batch-sizes"),
    (["vram", "--preset", "tiny", "--checkpoint", "x"], "--checkpoint"),
])
def test_usage_errors_exit_2_before_any_work(no_model, cli, args, option):
    code, _, err = cli(*args)
    assert code == 2 and option in one_error_line(err)


# --- 16: vram skips sizes the memory model says cannot fit, and can answer from the model alone ------------------


def test_vram_skips_sizes_that_clearly_exceed_available_memory_in_seconds(monkeypatch, cli):
    monkeypatch.setattr(sweep, "available_memory", lambda device: 2 * 1024**2)  # 2 MiB free
    monkeypatch.setattr(sweep, "measure_in_subprocess", lambda *a, **k: pytest.fail("measured a skipped size"))
    code, out, err = cli("vram", "--preset", "tiny", "--batch-sizes", "1", "2", "--seq-len", "128",
                         "--device", "cpu", "--json")
    assert code == 0, err
    rows = json.loads(out)["rows"]
    assert all(r["measured_peak_bytes"] is None and r["skipped"].startswith("needs about") for r in rows)
    code, out, _ = cli("vram", "--preset", "tiny", "--batch-sizes", "1", "--seq-len", "128", "--device", "cpu")
    assert code == 0 and "batch size 1 skipped: needs about" in out and "GiB available" in out


def test_vram_measure_all_measures_a_size_that_would_be_skipped(monkeypatch, cli):
    monkeypatch.setattr(sweep, "available_memory", lambda device: 2 * 1024**2)
    code, out, err = cli("vram", "--preset", "tiny", "--batch-sizes", "1", "--seq-len", "64", "--device", "cpu",
                         "--measure-all", "--json")
    assert code == 0, err
    row = json.loads(out)["rows"][0]
    assert row["skipped"] is None and row["measured_peak_bytes"] > 0


def test_vram_estimate_only_answers_from_the_memory_model_for_a_device_this_machine_lacks(cpu_only, monkeypatch, cli):
    monkeypatch.setattr(sweep, "measure_in_subprocess", lambda *a, **k: pytest.fail("measured with --estimate-only"))
    monkeypatch.setattr(sweep, "measure_step", lambda *a, **k: pytest.fail("measured with --estimate-only"))
    code, out, err = cli("vram", "--batch-sizes", "1", "2", "4", "--device", "cuda", "--estimate-only", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["device"] == "cuda" and [r["batch_size"] for r in report["rows"]] == [1, 2, 4]
    estimates = [r["estimated_peak_bytes"] for r in report["rows"]]
    assert all(r["measured_peak_bytes"] is None for r in report["rows"]) and estimates == sorted(estimates)
    assert estimates[0] > GIB  # the default preset: gigabytes, answered without building it

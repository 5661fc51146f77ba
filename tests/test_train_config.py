"""TrainConfig's one description per field, the options built from it, and the flat formats that must keep loading."""

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import pytest
import typer
from typer.testing import CliRunner

from nanovlm_cli.cli import app as app_module
from nanovlm_cli.cli.config_options import described_fields, field_option, flag_name, with_config_options
from nanovlm_cli.config import TrainConfig as ReExported
from nanovlm_cli.presets import get_preset
from nanovlm_cli.run_config import resolve_resume_config, resolve_run_config
from nanovlm_cli.train_config import GROUPS, RUN, TrainConfig, option

FIXTURE = Path(__file__).parent / "fixtures" / "run_config_v0"


def test_config_module_re_exports_the_same_class():
    assert ReExported is TrainConfig


def test_every_field_has_one_description_and_a_known_group():
    assert [f.name for f in described_fields(TrainConfig)] == [f.name for f in fields(TrainConfig)]
    for f in fields(TrainConfig):
        assert f.metadata["help"].strip().endswith((".", ")")), f.name
        assert f.metadata["group"] in GROUPS, f.name


def test_fields_are_declared_group_by_group():
    groups = [f.metadata["group"] for f in fields(TrainConfig)]
    firsts = list(dict.fromkeys(groups))
    assert groups == sorted(groups, key=firsts.index), "fields of one group must be declared together"


def test_train_options_carry_the_field_help_panel_and_type():
    params = {p.name: p for p in app_module.get_command().commands["train"].params}
    for f in fields(TrainConfig):
        param = params[f.name]
        assert flag_name(f) in param.opts
        assert param.help == f.metadata["help"], f.name
        assert param.rich_help_panel == f.metadata["group"], f.name
        assert param.default is None, f"{f.name}: an option must default to 'not given'"
        if isinstance(f.default, bool):
            assert param.secondary_opts == ["--no-" + flag_name(f)[2:]], f.name
    assert params["batch_size"].min == 1 and params["shapes_multiple_choice"].max == 1.0


def test_flat_attribute_access_keeps_working():
    cfg = TrainConfig(lr_mp=1e-3, dataset="x", batch_size=2)
    assert (cfg.lr_mp, cfg.dataset, cfg.batch_size, cfg.freeze_vision_encoder) == (1e-3, "x", 2, False)


def test_an_unknown_group_is_refused():
    with pytest.raises(ValueError, match="not one of"):
        option(1, help="x.", group="Elsewhere")


@dataclass(frozen=True)
class _Toy:
    rank: int = option(8, group=RUN, min=1, help="Rank of the thing.")
    mode: Literal["a", "b"] = option("a", group=RUN, help="A mode.")
    fast: bool = option(False, group=RUN, help="Go fast.")
    where: str | None = option(None, group=RUN, path=True, metavar="DIR", help="A place.")
    legacy: int = option(0, group=RUN, flag="--old-name", help="Spelled the old way.")


def test_adding_a_field_adds_its_flag():
    """The whole recipe for a new flag: a described field; the command receives it in **fields (a path as a Path)."""
    got: dict[str, Any] = {}

    @with_config_options(_Toy, before="verbose", beside={"extra": "mode"})
    def command(verbose: bool = False, extra: int = 0, **fields: Any) -> None:
        got.update(fields, verbose=verbose, extra=extra)

    app = typer.Typer()
    app.command()(command)
    app.command("other")(lambda: None)  # two commands: `command` is invoked by name
    result = CliRunner().invoke(app, ["command", "--rank", "3", "--fast", "--where", "d", "--old-name", "5",
                                      "--extra", "2"])
    assert result.exit_code == 0, result.output
    assert got == {"rank": 3, "mode": None, "fast": True, "where": Path("d"), "legacy": 5, "verbose": False, "extra": 2}
    names = [p.name for p in typer.main.get_command(app).commands["command"].params]
    assert names == ["rank", "mode", "extra", "fast", "where", "legacy", "verbose"]
    bad = CliRunner().invoke(app, ["command", "--rank", "0"])
    assert bad.exit_code == 2 and "--rank" in bad.output


def test_field_option_of_an_undescribed_field_names_the_fix():
    with pytest.raises(KeyError, match="option\\(help=..., group=...\\)"):
        field_option(TrainConfig, "no_such_field")


def test_saved_run_config_of_the_flat_format_still_resumes():
    """A run_config.json written before the fields were grouped (committed fixture) resumes with its values."""
    saved = json.loads((FIXTURE / "run_config.json").read_text())
    model, train = resolve_resume_config(FIXTURE, overrides={"max_steps": 9})
    expected = {**TrainConfig().to_dict(), **saved["train"], "max_steps": 9, "resume": str(FIXTURE)}  # newer: defaults
    assert train.to_dict() == expected
    assert (train.batch_size, train.lr_vision, train.freeze_vision_encoder, train.seed) == (3, 0.0, True, 7)
    assert model.language.n_layers == saved["model"]["language"]["n_layers"]


def test_flat_config_file_still_loads():
    model, train = resolve_run_config("tiny", config_file=str(FIXTURE / "run.toml"), overrides={"seed": 11})
    tiny = get_preset("tiny").train
    assert (train.batch_size, train.gradient_accumulation_steps, train.max_seq_len) == (2, 2, 256)
    assert (train.freeze_vision_encoder, train.packing, train.output_dir, train.seed) == (True, False, "somewhere", 11)
    assert train.shapes_turns == tiny.shapes_turns  # not in the file: the preset's value
    assert model.chat_template == "plain"


def test_no_two_train_options_share_a_name():
    """A field whose flag is one of the command's own (or another field's) would silently shadow it."""
    names = [n for p in app_module.get_command().commands["train"].params for n in (*p.opts, *p.secondary_opts)]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)

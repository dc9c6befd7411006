"""One source for every option: `train` (and `lr-find`) are generated from TrainConfig's fields, and no verb
writes a default that the function or dataclass doing the work already holds."""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

import pytest
import typer

from transferlab import api, cli
from transferlab.config import TrainConfig, field_default, option_fields
from transferlab.export.limits import ServeLimits

COMMANDS = typer.main.get_command(cli.app).commands
# train's options that are not TrainConfig fields: how to run (resume, a config file, --set), not what
TRAIN_OWN = {"data", "resume", "allow_changed_data", "config", "set_", "verbose"}


def _params(verb: str) -> dict:
    return {p.name: p for p in COMMANDS[verb].params}


def test_every_config_field_is_an_option_or_says_why_it_is_not():
    for f in dataclasses.fields(TrainConfig):
        assert ("option" in f.metadata) != ("internal" in f.metadata), f"TrainConfig.{f.name}: option(...) or internal(why=...)"


def test_train_has_one_option_per_config_field_with_its_default_help_and_panel():
    params = _params("train")
    fields = option_fields()
    assert set(params) == {f.name for f in fields} | TRAIN_OWN
    for f in fields:
        spec, param = f.metadata["option"], params[f.name]
        assert param.default == field_default(f), f.name
        assert param.help == spec.help and param.rich_help_panel == spec.panel, f.name
        if spec.flags:
            assert tuple(param.opts) == spec.flags, f.name
    internal = [f.name for f in dataclasses.fields(TrainConfig) if "internal" in f.metadata]
    assert internal and not (set(internal) - {"data"}) & set(params)  # data: the DATA argument


def test_the_flags_people_type_are_kept():
    params = _params("train")
    assert params["out"].opts == ["--out", "-o"] and params["loggers"].opts == ["--logger"]
    assert params["loggers"].metavar == "NAME" and params["loggers"].multiple
    assert params["pretrained"].opts == ["--pretrained"] and params["pretrained"].secondary_opts == ["--no-pretrained"]
    assert params["csv_anywhere"].opts == ["--csv-anywhere"] and not params["csv_anywhere"].secondary_opts


def test_lr_find_shares_trains_options_and_reads_its_own_defaults_from_the_api():
    train, lr_find = _params("train"), _params("lr-find")
    shared = set(cli._LR_FIND_OPTIONS)
    assert shared <= set(train) and shared <= set(lr_find)
    for name in shared:
        assert (lr_find[name].default, lr_find[name].help, lr_find[name].opts) == \
               (train[name].default, train[name].help, train[name].opts), name
    own = inspect.signature(api.lr_find).parameters
    for name in ("num_steps", "method", "start_lr", "end_lr"):
        assert lr_find[name].default == own[name].default, name


@pytest.mark.parametrize("verb, option, owner", [
    ("predict", "top_k", api.predict), ("predict", "batch_size", api.predict),
    ("evaluate", "batch_size", api.evaluate), ("evaluate", "top_losses", api.evaluate),
    ("export", "parity_images", api.export_model), ("serve", "port", api.serve),
    ("serve", "max_pixels", ServeLimits), ("serve", "top_k", ServeLimits), ("shards", "shard_size", api.shards),
])
def test_a_verbs_default_is_its_owners(verb, option, owner):
    assert _params(verb)[option].default == inspect.signature(owner).parameters[option].default


def test_shards_split_as_train_splits():
    shards = inspect.signature(api.shards).parameters
    assert (shards["val_split"].default, shards["seed"].default) == (TrainConfig().val_split, TrainConfig().seed)


def _literal(node: ast.expr):
    try:
        return True, ast.literal_eval(node)
    except ValueError:
        return False, None


def test_no_verb_writes_a_literal_default():
    """A default typed into cli.py is a second copy of one the library holds (or will drift from it): each is
    read from TrainConfig, or from the signature of the function (or dataclass) the verb calls. None (the
    option not given: its owner decides) and False (a flag, off unless given) are no copies of anything."""
    tree = ast.parse(Path(inspect.getsourcefile(cli)).read_text(encoding="utf-8"))
    written = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef) or not any("command" in ast.unparse(d) for d in node.decorator_list):
            continue
        args = node.args
        for arg, default in [*zip(args.args[len(args.args) - len(args.defaults):], args.defaults),
                             *zip(args.kwonlyargs, args.kw_defaults)]:
            is_literal, value = _literal(default) if default is not None else (False, None)
            if is_literal and value is not None and value is not False:
                written.append(f"{node.name} {arg.arg} = {ast.unparse(default)}")
    assert written == [], ("cli.py writes these defaults itself; read them from their owner (TrainConfig, "
                           f"cli._defaults(function or dataclass)) instead: {written}")


def test_the_api_takes_the_option_names():
    options = {f.name: field_default(f) for f in option_fields()}
    assert TrainConfig.from_options("train", "data/", options) == TrainConfig(data="data/")

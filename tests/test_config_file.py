"""`train --config FILE` takes a YAML of options as defaults (a run's config.yaml works), `--set KEY=VALUE`
sets any field; both checked before any work, with the closest names for a typo. The API takes `config=`."""

from __future__ import annotations

import yaml
from conftest import make_image_folder
from guarantees import TINY_FLAGS, cli

import transferlab


def _yaml(path, **fields):
    path.write_text(yaml.safe_dump(fields))
    return path


def test_config_file_gives_the_defaults_and_command_line_options_win(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=(4, 2))
    config = _yaml(tmp_path / "c.yaml", head_dropout=0.35, epochs_frozen=2, seed=7, strategy="head-only")
    r = cli("train", data, *TINY_FLAGS, "--config", config, "--seed", "3", "-o", tmp_path / "run")
    assert r.code == 0, r.text
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    # TINY_FLAGS gives --epochs-frozen 3 on the command line: it wins over the file's 2, as --seed 3 over 7
    assert saved["head_dropout"] == 0.35 and saved["strategy"] == "head-only"
    assert saved["epochs_frozen"] == 3 and saved["seed"] == 3


def test_set_wins_over_everything_and_a_runs_config_yaml_is_a_config_file(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=(4, 2))
    first = cli("train", data, *TINY_FLAGS, "--strategy", "head-only", "--head-dropout", "0.1", "-o", tmp_path / "a")
    assert first.code == 0, first.text
    # the run's own config.yaml (data included) as defaults for a second run elsewhere
    r = cli("train", "--config", tmp_path / "a" / "config.yaml", "--set", "head_dropout=0.25", "--set", "seed=5",
            "-o", tmp_path / "b")
    assert r.code == 0, r.text
    saved = yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())
    assert saved["head_dropout"] == 0.25 and saved["seed"] == 5 and saved["strategy"] == "head-only"
    assert saved["data"] == str(data.resolve())


def test_bad_config_files_and_sets_are_clear_errors_before_any_work(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=(4, 2))
    cases = [
        (["--config", tmp_path / "missing.yaml"], "missing.yaml"),
        (["--config", _yaml(tmp_path / "typo.yaml", head_dropuot=0.2)], "did you mean 'head_dropout'"),
        (["--config", _yaml(tmp_path / "type.yaml", epochs_frozen="many")], "'epochs_frozen' must be int"),
        (["--set", "lr_hed=0.1"], "did you mean 'lr_head'"),
        (["--set", "seed"], "KEY=VALUE"),
        (["--set", "batch_size=big"], "'batch_size' must be int"),
    ]
    for args, expected in cases:
        out = tmp_path / "never"
        r = cli("train", data, *TINY_FLAGS, *args, "-o", out)
        assert r.code == 2 and expected in r.text and "Traceback" not in r.text, (args, r.text)
        assert not out.exists()


def test_the_api_takes_a_config_file_too(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=(4, 2))
    config = _yaml(tmp_path / "c.yaml", backbone="test_efficientnet", pretrained=False, img_size=32, epochs_frozen=2,
                   strategy="head-only", batch_size=8, num_workers=0, progress=False, report=False, head_dropout=0.3)
    result = transferlab.train(data, config=config, out=str(tmp_path / "run"), seed=4)
    saved = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert saved["head_dropout"] == 0.3 and saved["seed"] == 4 and saved["epochs_frozen"] == 2

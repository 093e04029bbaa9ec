"""Configuration files and option parsing."""

from __future__ import annotations

import pytest

from srdvol.app.config import config_defaults, load_config_file
from srdvol.errors import ConfigError


def test_toml_flat_keys_and_command_table(tmp_path):
    file = tmp_path / "run.toml"
    file.write_text("patch = [32, 64, 64]\nsteps = 10\n[train]\nsteps = 99\nbatch-size = 2\n")
    train = load_config_file(file, command="train")
    predict = load_config_file(file, command="predict")
    assert train == {"patch": (32, 64, 64), "steps": 99, "batch_size": 2}
    assert predict == {"patch": (32, 64, 64), "steps": 10}
    assert config_defaults(train)["patch"] == "32,64,64"
    assert (
        config_defaults({"sampling": predict.get("sampling", "spatial")})["sampling"] == "spatial"
    )


def test_yaml_file(tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text("overlap: 0.5\nsampling: temporal\nsize: [64, 96]\n")
    assert load_config_file(file, command="denoise") == {
        "overlap": 0.5,
        "sampling": "temporal",
        "size": (64, 96),
    }


@pytest.mark.parametrize(
    ("content", "suffix", "message"),
    [
        ("pach = [1, 2, 3]\n", ".toml", "'pach'"),
        ("overlap = 1.5\n", ".toml", "'overlap'"),
        ("steps = = 3\n", ".toml", "cannot be parsed"),
        ("steps: 3\n", ".ini", "unknown configuration format"),
        ("[train]\nsampling = 'diagonal'\n", ".toml", r"\[train\] key 'sampling'"),
    ],
)
def test_bad_config_files_name_the_file_and_key(tmp_path, content, suffix, message):
    file = tmp_path / f"run{suffix}"
    file.write_text(content)
    with pytest.raises(ConfigError, match=message) as info:
        load_config_file(file, command="train")
    assert str(file) in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config_file(tmp_path / "nope.toml", command="train")

"""The one place each option is checked: a table of bad values, each refused naming its option
(``patch`` in the library, ``--patch`` on the command line), and the groups a flat option sets."""

from __future__ import annotations

import pytest

from srdvol.errors import ConfigError
from srdvol.options import (
    DEFAULT_OVERLAP,
    MAX_OVERLAP,
    Patch,
    PredictOptions,
    RunOptions,
    TrainOptions,
    check_overlap,
    parse_gpus,
)

BAD = [
    # (flat options, the option named, words of the problem)
    ({"patch": "16,64"}, "patch", "not three positive integers"),
    ({"patch": "a,b,c"}, "patch", "not three positive integers"),
    ({"patch": "0,64,64"}, "patch", "not three positive integers"),
    ({"patch": "16,64,64,64"}, "patch", "not three positive integers"),
    ({"patch": "16.5,64,64"}, "patch", "not three positive integers"),
    ({"patch": ""}, "patch", "not three positive integers"),
    ({"patch": "24,64,64"}, "patch", "patch_t 24 is not a multiple of 16"),
    ({"block": "64,0,512"}, "block", "not three positive integers"),
    ({"block": [64, 512]}, "block", "not three positive integers"),
    ({"overlap": -0.1}, "overlap", f"outside [0, {MAX_OVERLAP}]"),
    ({"overlap": 0.99}, "overlap", f"outside [0, {MAX_OVERLAP}]"),
    ({"overlap": "lots"}, "overlap", "valid number"),
    ({"steps": 0}, "steps", "greater than or equal to 1"),
    ({"batch_size": 0}, "batch_size", "greater than or equal to 1"),
    ({"lr": 0}, "lr", "greater than 0"),
    ({"lr": float("inf")}, "lr", "finite number"),
    ({"sampling": "diagonal"}, "sampling", "'spatial', 'temporal' or 'auto'"),
    ({"window": "box"}, "window", "'tent' or 'cos2'"),
    ({"dtype": "int8"}, "dtype", "'float32' or 'input'"),
    ({"ngff": "0.3"}, "ngff", "'0.5' or '0.4'"),
    ({"autocast": "maybe"}, "autocast", "'auto', 'on' or 'off'"),
    ({"anchor": -1}, "anchor", "greater than or equal to 0"),
    ({"anchor": "wide"}, "anchor", "valid number"),
    ({"anchor": float("inf"), "guide": 2}, "anchor", "finite number"),
    ({"level": -1}, "level", "greater than or equal to 0"),
    ({"workers": 0}, "workers", "greater than or equal to 1"),
    ({"gpus": "gpu0"}, "gpus", "not a GPU choice"),
    ({"chunks": "16,0,64"}, "chunks", "not three positive integers"),
    ({"compression": "11"}, "compression", "not a compression level"),
    ({"compression": "zlib"}, "compression", "not a compression level"),
    ({"t": "5:2"}, "t", "not a range START:STOP"),
    ({"x": "a:b"}, "x", "not a range START:STOP"),
    ({"patches": "16,64,64"}, "patches", "is not an option"),
]


@pytest.mark.parametrize(("flat", "name", "words"), BAD, ids=[f"{b[1]}={b[0]}" for b in BAD])
def test_each_bad_value_is_refused_naming_its_option(flat, name, words):
    with pytest.raises(ConfigError) as info:
        RunOptions.from_flat(flat)
    assert str(info.value).startswith(f"{name}: "), str(info.value)
    assert words in str(info.value)
    flag = "--" + name.replace("_", "-")
    assert info.value.command_line_message().startswith(f"{flag}: ")


def test_patch_reads_every_form_users_write():
    expected = Patch(32, 64, 64)
    for value in (
        "32,64,64",
        " 32, 64,64 ",
        (32, 64, 64),
        [32, 64, 64],
        {"t": 32, "y": 64, "x": 64},
    ):
        assert Patch.parse(value) == expected
    assert expected.text() == "32,64,64" and expected.as_dict() == {"t": 32, "y": 64, "x": 64}
    assert Patch.parse(expected) is expected


def test_flat_options_set_their_groups_and_patch_sets_both_patches():
    options = RunOptions.from_flat(
        {"patch": "32,64,64", "steps": 7, "overlap": 0.5, "level": 1, "overwrite": True}
    )
    assert options.train.patch == options.predict.patch == (32, 64, 64)
    assert options.train.steps == 7 and options.predict.overlap == 0.5
    assert options.read.level == 1
    assert options.output.overwrite and not options.train.overwrite
    trained = RunOptions.from_flat({"overwrite": True}, overwrite="train")
    assert trained.train.overwrite and not trained.output.overwrite


def test_defaults_are_written_once_and_the_overlap_limit_is_shared():
    assert PredictOptions().overlap == DEFAULT_OVERLAP
    assert check_overlap(MAX_OVERLAP) == MAX_OVERLAP
    with pytest.raises(ConfigError):
        check_overlap(MAX_OVERLAP + 0.01)
    assert TrainOptions().patch_or_default() == (64, 128, 128)
    assert TrainOptions().patch_or_default(16) == (16, 128, 128)


def test_options_are_frozen_and_replace_validates():
    options = TrainOptions(steps=3)
    with pytest.raises(ValueError):
        options.steps = 4  # type: ignore[misc]
    assert options.replace(steps=5).steps == 5
    with pytest.raises(ConfigError, match=r"^steps: "):
        options.replace(steps=0)


def test_output_chunks_and_compression_read_the_forms_users_write():
    output = RunOptions.from_flat({"chunks": "8,256,256", "compression": "none"}).output
    assert output.chunk_map() == {"t": 8, "y": 256, "x": 256} and output.compression == 0
    assert RunOptions.from_flat({"compression": "9"}).output.compression == 9
    assert RunOptions().output.compression == 3 and RunOptions().output.chunk_map() is None


def test_gpu_choices():
    assert parse_gpus(None) is None
    assert parse_gpus("ALL") == "all"
    assert parse_gpus("0, 2") == [0, 2]
    assert parse_gpus([1, "GPU-abcd"]) == [1, "GPU-abcd"]


def test_the_anchor_default_follows_the_guide_and_a_given_anchor_wins():
    from srdvol.values import DEFAULT_ANCHOR, GUIDED_ANCHOR

    assert RunOptions.from_flat({}).predict.anchor == DEFAULT_ANCHOR
    assert RunOptions.from_flat({"guide": 2}).predict.anchor == GUIDED_ANCHOR != DEFAULT_ANCHOR
    assert RunOptions.from_flat({"guide": 2, "anchor": 3}).predict.anchor == 3
    assert RunOptions.from_flat({"guide": 2, "anchor": 0}).predict.anchor == 0
    # a copy with another guide derives the default again; a given anchor stays
    assert RunOptions.from_flat({}).predict.replace(guide=2).anchor == GUIDED_ANCHOR
    assert RunOptions.from_flat({"guide": 2}).predict.replace(guide=0).anchor == DEFAULT_ANCHOR
    assert RunOptions.from_flat({"anchor": 3}).predict.replace(guide=2).anchor == 3


def test_restore_turns_the_anchor_off_and_refuses_a_given_anchor_or_guide():
    assert RunOptions.from_flat({"restore": 4}).predict.anchor == 0
    assert RunOptions.from_flat({"restore": 4, "anchor": 0}).predict.anchor == 0
    assert RunOptions.from_flat({}).predict.replace(restore=3).anchor == 0
    assert RunOptions.from_flat({"restore": 3}).predict.replace(restore=0).anchor == 4.0
    for other in ({"anchor": 2}, {"guide": 2}):
        with pytest.raises(ConfigError, match=r"restore.*replaces"):
            RunOptions.from_flat({"restore": 4, **other})

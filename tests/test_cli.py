"""The command line: help, option parsing, one-line errors and exit codes."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest
from cli_run import run_cli

from srdvol.app.cli import main


def test_console_script_help_lists_every_command():
    result = subprocess.run(
        [sys.executable, "-m", "srdvol.app.cli", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    for command in ("denoise", "train", "predict", "simulate", "evaluate", "info", "demo"):
        assert command in result.stdout


def test_version(capsys):
    from srdvol import __version__

    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out.strip() == f"srdvol {__version__}"


def test_info_describes_an_image_and_a_model(bad_inputs, capsys):
    code, out, _ = run_cli(capsys, "info", str(bad_inputs / "in.zarr"), "--patch", "16,32,32")
    assert code == 0
    assert "shape (32, 32, 32)" in out and "NGFF 0.5" in out
    assert "patch (16, 32, 32)" in out and "blocks" in out
    assert "input's own levels above a Gaussian of 4 px (--anchor)" in out
    assert "--guide" not in out
    plain_cost = float(re.search(r"cost +([\d.]+) model voxels", out).group(1))
    code, out, _ = run_cli(
        capsys, "info", str(bad_inputs / "in.zarr"), "--patch", "16,32,32", "--tta", "--anchor", "0"
    )
    assert code == 0 and "the network's own output (--anchor 0); --tta" in out
    tta_cost = float(re.search(r"cost +([\d.]+) model voxels", out).group(1))
    assert tta_cost == pytest.approx(8 * plain_cost, abs=0.05)
    code, out, _ = run_cli(
        capsys, "info", str(bad_inputs / "in.zarr"), "--patch", "16,32,32", "--guide", "3"
    )
    assert code == 0 and "windows of radius 3 px with the mean image of 32 input frames" in out
    assert "above a Gaussian of 4.5 px (--anchor, shaped like the mean image)" in out
    code, out, _ = run_cli(
        capsys, "info", str(bad_inputs / "in.zarr"), "--patch", "16,32,32", "--restore", "4"
    )
    assert code == 0 and "amplitude put back (--restore: 4 activity patterns per 44-px" in out
    assert "over 1 stretch(es) of 32 frames" in out and "Gaussian" not in out
    code, out, _ = run_cli(capsys, "info", str(bad_inputs / "m16.safetensors"))
    assert code == 0
    assert "patch      [16, 16, 16]" in out and '"spatial"' in out and "sha256" in out


def test_config_file_sets_options_and_the_command_line_wins(bad_inputs, tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text("[info]\npatch = [16, 16, 16]\n")
    image = str(bad_inputs / "in.zarr")
    code, out, _ = run_cli(capsys, "info", image, "--config", str(config))
    assert code == 0 and "patch (16, 16, 16)" in out
    code, out, _ = run_cli(capsys, "info", image, "--config", str(config), "--patch", "32,8,8")
    assert code == 0 and "patch (32, 8, 8)" in out


def test_unknown_option_is_a_usage_error(capsys):
    code, _, err = run_cli(capsys, "info", "x.zarr", "--pach", "16,32,32")
    assert code == 2
    assert "--pach" in err
    assert "Traceback" not in err


def test_bad_config_file_is_one_line_error(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text("overlap = 2\n")
    code, _, err = run_cli(capsys, "info", "x.zarr", "--config", str(config))
    assert code == 2
    assert err.count("\n") == 1
    assert "run.toml" in err and "'overlap'" in err
    assert "Traceback" not in err


def test_bad_patch_option_names_the_fix(tmp_path, capsys):
    code, _, err = run_cli(capsys, "info", str(tmp_path / "x.zarr"), "--patch", "16,32")
    assert code == 2
    assert "--patch 32,64,64" in err


@pytest.mark.parametrize("debug", [False, True])
def test_debug_shows_traceback(tmp_path, capsys, debug):
    config = tmp_path / "run.toml"
    config.write_text("overlap = 2\n")
    args = (["--debug"] if debug else []) + ["info", "x.zarr", "--config", str(config)]
    if debug:
        from srdvol.errors import ConfigError

        with pytest.raises(ConfigError):
            main(args)
    else:
        code, _, _ = run_cli(capsys, *args)
        assert code == 2


# ---------------------------------------------------------------------------------------------
# DESIGN section 6: every bad input is one sentence (file, problem, fix), exit code 2, nothing
# written, input unchanged.


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    """A small simulated recording, a tiny trained model, and one store per kind of bad input."""
    import numpy as np
    import zarr

    from srdvol.model.config import NetworkConfig
    from srdvol.simulate import simulate
    from srdvol.training.loop import train

    root = tmp_path_factory.mktemp("bad-inputs")
    simulate(root / "in.zarr", truth=root / "truth.zarr", frames=32, size=(32, 32), seed=0)
    train(
        root / "in.zarr",
        root / "m16.safetensors",
        patch=(16, 16, 16),
        steps=1,
        batch_size=1,
        network=NetworkConfig.tiny(patch_t=16),
        progress=False,
    )

    def plain(name, shape, dtype, data=None):
        array = zarr.create_array(root / name, shape=shape, dtype=dtype, chunks=(16, 32, 32))
        array[...] = 1 if data is None else data

    plain("zyx.zarr", (16, 32, 32), "uint16")
    plain("short.zarr", (8, 32, 32), "uint16")
    plain("complex.zarr", (16, 32, 32), "complex64")
    plain("bool.zarr", (16, 32, 32), "bool")
    values = np.random.default_rng(0).normal(100, 10, (32, 32, 32)).astype("float32")
    values[20, 5, 5] = np.nan
    plain("nan.zarr", values.shape, "float32", values)
    (root / "notes.txt").write_text("not a store")
    return root


MODEL = ["--model", "m16.safetensors"]
BAD_INPUTS = [
    # (case, argv, subject named in the message, words of the problem or fix)
    ("not a Zarr store", ["predict", "notes.txt", "out.zarr", *MODEL], "notes.txt", "not a Zarr"),
    (
        "missing input",
        ["predict", "nowhere.zarr", "out.zarr", *MODEL],
        "nowhere.zarr",
        "no such file",
    ),
    (
        "no time axis",
        ["predict", "zyx.zarr", "out.zarr", "--axes", "zyx", *MODEL],
        "zyx.zarr",
        "no time axis",
    ),
    (
        "fewer than 16 frames",
        ["predict", "short.zarr", "out.zarr", "--axes", "tyx", *MODEL],
        "short.zarr",
        "16",
    ),
    (
        "complex dtype",
        ["predict", "complex.zarr", "out.zarr", "--axes", "tyx", *MODEL],
        "complex.zarr",
        "complex",
    ),
    (
        "bool dtype",
        ["predict", "bool.zarr", "out.zarr", "--axes", "tyx", *MODEL],
        "bool.zarr",
        "bool",
    ),
    (
        "patch_t not a multiple of 16",
        ["train", "in.zarr", "out.safetensors", "--patch", "20,16,16"],
        "--patch",
        "multiple of 16",
    ),
    (
        "NaN in the data",
        ["predict", "nan.zarr", "out.zarr", "--axes", "tyx", *MODEL],
        "nan.zarr",
        "NaN",
    ),
    (
        "output inside the input",
        ["predict", "in.zarr", "in.zarr/out.zarr", *MODEL],
        "in.zarr/out.zarr",
        "inside the input",
    ),
    (
        "output of another run",
        ["predict", "in.zarr", "truth.zarr", *MODEL],
        "truth.zarr",
        "another srdvol run",
    ),
    (
        "unreachable scheduler",
        ["predict", "in.zarr", "out.zarr", "--scheduler", "tcp://127.0.0.1:9", *MODEL],
        "tcp://127.0.0.1:9",
        "scheduler",
    ),
    (
        "GPU requested but absent",
        ["predict", "in.zarr", "out.zarr", "--gpus", "0", *MODEL],
        "--gpus",
        "not visible",
    ),
    (
        "GPU absent, before training",
        ["denoise", "in.zarr", "out.zarr", "--gpus", "0"],
        "--gpus",
        "not visible",
    ),
    (
        "model trained with another patch",
        ["predict", "in.zarr", "out.zarr", "--patch", "32,16,16", *MODEL],
        "m16.safetensors",
        "--patch 16,16,16",
    ),
    (
        "missing model",
        ["predict", "in.zarr", "out.zarr", "--model", "none.safetensors"],
        "none.safetensors",
        "does not exist",
    ),
]


@pytest.mark.parametrize(
    ("argv", "subject", "words"), [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS]
)
def test_bad_input_is_one_clear_sentence_and_writes_nothing(
    bad_inputs, monkeypatch, capsys, store_digest, argv, subject, words
):
    monkeypatch.chdir(bad_inputs)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    before = {p.name: store_digest(p) for p in bad_inputs.iterdir() if p.is_dir()}
    files_before = sorted(p.name for p in bad_inputs.iterdir())

    code, out, err = (
        run_cli(capsys, *argv, "--dashboard-address", ":0")
        if argv[0] in {"predict", "denoise"}
        else run_cli(capsys, *argv)
    )

    assert code == 2
    message = err.strip()
    assert message.count("\n") == 0, message
    assert message.startswith(f"srdvol: error: {subject}")
    assert words in message
    assert "Traceback" not in err + out
    assert sorted(p.name for p in bad_inputs.iterdir()) == files_before  # nothing written
    assert {p.name: store_digest(p) for p in bad_inputs.iterdir() if p.is_dir()} == before


def test_train_overwrite_replaces_an_existing_model(bad_inputs, tmp_path, monkeypatch, capsys):
    from srdvol.model.checkpoint import read_record

    monkeypatch.chdir(tmp_path)
    model = tmp_path / "m.safetensors"
    shutil.copy(bad_inputs / "m16.safetensors", model)  # a tiny network
    argv = ["train", str(bad_inputs / "in.zarr"), str(model), "--patch", "16,16,16"]
    code, _, err = run_cli(capsys, *argv, "--steps", "1", "--batch-size", "1")
    assert code == 2 and "--overwrite to replace it" in err
    code, _, err = run_cli(capsys, *argv, "--steps", "1", "--batch-size", "1", "--overwrite")
    assert code == 0, err
    record = read_record(model)
    assert record.network.channels == (8, 16, 32, 64)  # the default network replaced the tiny one
    assert record.steps == 1 and record.weights_sha256


@pytest.mark.parametrize(
    ("text", "words"),
    [("dtype = 'int8'\n", "'dtype'"), ("autocast = 'maybe'\n", "'autocast'")],
)
def test_config_file_choices_are_checked(tmp_path, capsys, text, words):
    config = tmp_path / "run.toml"
    config.write_text(text)
    code, _, err = run_cli(
        capsys, "predict", "in.zarr", "out.zarr", "--model", "m", "--config", str(config)
    )
    assert code == 2 and err.count("\n") == 1
    assert "run.toml" in err and words in err


def test_help_shows_a_default_for_every_option_and_a_guide_for_every_choice():
    """`srdvol COMMAND --help` names each option's default (a value or what happens without
    it), and each choice option says what its choices are for (issue 11)."""
    import typer

    from srdvol.app.cli import app

    group = typer.main.get_command(app)
    missing, unguided = [], []
    assert len(group.commands) >= 7
    for name, command in group.commands.items():
        ctx = command.make_context(name, [], resilient_parsing=True)
        for param in command.params:
            if param.param_type_name != "option" or param.is_flag or param.required:
                continue
            if param.name in ("help", "version", "debug"):
                continue
            record = param.get_help_record(ctx)
            text = " ".join(record[1].split()) if record else ""
            if "[default:" not in text:
                missing.append(f"{name} {param.opts[0]}")
            metavar = record[0] if record else ""
            if "|" in metavar:  # a choice option: <spatial|temporal|auto>
                choices = metavar.split("<", 1)[1].rstrip(">").split("|")
                guide = text.split("[default:")[0]
                if not all(choice in guide for choice in choices):
                    unguided.append(f"{name} {param.opts[0]}")
    assert not missing, missing
    assert not unguided, unguided


def test_evaluate_shows_the_gaussian_reference_and_refuses_bad_sigmas(tmp_path, capsys):
    from srdvol.simulate import simulate

    simulate(tmp_path / "n.zarr", truth=tmp_path / "t.zarr", frames=16, size=(32, 32))
    n, t = str(tmp_path / "n.zarr"), str(tmp_path / "t.zarr")
    code, out, _ = run_cli(capsys, "evaluate", n, "--truth", t, "--noisy", n, "--gaussian", "1,2")
    assert code == 0
    assert "gaussian σ=" in out and "pixel_r" in out and "trace_gain" in out
    code, out, _ = run_cli(capsys, "evaluate", n, "--truth", t, "--noisy", n, "--gaussian", "none")
    assert code == 0 and "gaussian" not in out
    code, _, err = run_cli(capsys, "evaluate", n, "--truth", t, "--noisy", n, "--gaussian", "x")
    assert code == 2 and "--gaussian" in err and "Traceback" not in err


def test_simulate_without_truth_writes_it_beside_the_output(tmp_path, capsys, monkeypatch):
    import zarr

    from srdvol.app.commands import truth_beside

    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "simulate", "rec.zarr", "--frames", "16", "--size", "32", "32")
    assert code == 0, err
    assert "rec-truth.zarr (truth" in out + err
    noisy, truth = zarr.open_group("rec.zarr"), zarr.open_group("rec-truth.zarr")
    assert noisy["s0"].shape == truth["s0"].shape == (16, 32, 32)
    assert truth_beside("s3://lab/runs/day1.zarr/") == "s3://lab/runs/day1-truth.zarr"
    assert truth_beside("movie") == "movie-truth.zarr"


@pytest.mark.slow
def test_predict_tta_anchor_and_guide_are_the_predictors_and_are_recorded(
    tiny_model, tmp_path, monkeypatch, capsys
):
    import json

    import numpy as np
    import zarr

    from srdvol.ngff.read import open_image
    from srdvol.predict.block import predict_array
    from srdvol.predict.predictors import ModelPredictor
    from srdvol.simulate import simulate
    from srdvol.values import GUIDED_ANCHOR

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    noisy = tmp_path / "in.zarr"
    simulate(noisy, truth=tmp_path / "truth.zarr", frames=24, size=(24, 32), seed=5)
    common = ["--model", str(tiny_model), "--workers", "1", "--dashboard-address", ":0"]
    # --tta and --guide with the default anchor (guided: GUIDED_ANCHOR, shaped); the network's
    # own output with --anchor 0
    runs = {"tta": ["--tta", "--guide", "2"], "plain": ["--anchor", "0"]}
    for name, extra in runs.items():
        try:
            main(["predict", str(noisy), str(tmp_path / f"{name}.zarr"), *common, *extra])
        except SystemExit as exc:
            assert not exc.code, exc.code
    data = np.asarray(open_image(noisy).data, dtype=np.float32)
    predictors = {
        "tta": ModelPredictor(tiny_model, device="cpu", tta=True, anchor=GUIDED_ANCHOR, guide=2),
        "plain": ModelPredictor(tiny_model, device="cpu"),
    }
    written = {}
    for name, predictor in predictors.items():
        written[name] = zarr.open_array(tmp_path / f"{name}.zarr" / "s0", mode="r")[...]
        expected = predict_array(data, predictor, patch=(16, 16, 16), overlap=0.25)
        got = written[name].reshape(expected.shape)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-3)
    assert np.abs(written["tta"] - written["plain"]).max() > 1e-2
    recorded = {
        name: json.loads((tmp_path / f"{name}.zarr" / "zarr.json").read_text())["attributes"][
            "srdvol"
        ]["parameters"]
        for name in runs
    }
    assert recorded["tta"]["tta"] is True and recorded["tta"]["anchor"] == GUIDED_ANCHOR != 4.0
    assert recorded["tta"]["guide"] == 2
    assert not {"tta", "anchor", "guide"} & set(recorded["plain"])
    # the --tta output is another run's for a plain predict, and the refusal says why
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:
        main(["predict", str(noisy), str(tmp_path / "tta.zarr"), *common, "--anchor", "0"])
    assert refused.value.code != 0
    error = capsys.readouterr().err
    assert f"parameters.anchor={GUIDED_ANCHOR} where this run has none" in error, error
    assert "parameters.tta=true where this run has none" in error, error
    assert "parameters.guide=2 where this run has none" in error, error
    assert "to resume it, rerun with the options it was written with" in error, error


def test_cpu_training_with_the_gpu_default_patch_gets_a_hint(monkeypatch):
    from srdvol.app.commands import cpu_patch_hint
    from srdvol.options import RunOptions

    monkeypatch.setattr("srdvol.dask.gpus.visible_gpus", lambda: [])
    hint = cpu_patch_hint(RunOptions.from_flat({}))
    assert hint is not None and "default patch 64,128,128" in hint
    assert "--patch 16,64,64 --steps 300" in hint
    # a patch of one's own, a remote scheduler or a GPU: nothing to say
    assert cpu_patch_hint(RunOptions.from_flat({"patch": (16, 64, 64)})) is None
    assert cpu_patch_hint(RunOptions.from_flat({"scheduler": "tcp://127.0.0.1:8786"})) is None
    monkeypatch.setattr("srdvol.dask.gpus.visible_gpus", lambda: ["0"])
    assert cpu_patch_hint(RunOptions.from_flat({})) is None
    # GPUs asked for but absent are reported when the cluster starts, not here
    monkeypatch.setattr("srdvol.dask.gpus.visible_gpus", lambda: [])
    assert cpu_patch_hint(RunOptions.from_flat({"gpus": "all"})) is None

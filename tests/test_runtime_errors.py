"""runtime/errors.py at every entry point: what a user can fix is one line, not a traceback."""

from __future__ import annotations

import json

import pytest

from tests.conftest import TINY_LDM_CONFIG


def test_a_folder_that_would_run_code_is_refused_by_generate_in_one_line(tmp_path, capsys):
    from ldm.generate import main

    folder = tmp_path / "hostile"
    folder.mkdir()
    marker = tmp_path / "ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\nclass Evil: pass\n")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": ["evil", "Evil"], "unet": ["evil", "Evil"]}))
    with pytest.raises(SystemExit) as exit_:
        main(["--model", str(folder), "--prompt", "a", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and err.count("\n") == 1 and err.startswith("error: ") and "code" in err
    assert not marker.exists()


@pytest.mark.parametrize("component", ["unet", "vae", "text_encoder"])
@pytest.mark.parametrize("pickle_name", ["diffusion_pytorch_model.bin", "model.ckpt"])
def test_a_folder_with_pickle_weights_is_refused_in_one_line_before_any_of_it_is_loaded(tmp_path, capsys, component, pickle_name):
    """A pipeline folder whose U-Net, VAE or text encoder has pickle weights only: the pickle is never opened (it
    would raise here if it were), and the line names the component and the file."""
    from ldm.generate import main
    from tests.conftest import tiny_pipeline

    folder = tmp_path / "pipeline"
    tiny_pipeline().save_pretrained(folder)
    for weights in (folder / component).glob("*.safetensors"):
        weights.unlink()
    (folder / component / pickle_name).write_bytes(b"a pickle that must not be opened")
    capsys.readouterr()  # save_pretrained's progress bar
    with pytest.raises(SystemExit) as exit_:
        main(["--model", str(folder), "--prompt", "a", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and err.count("\n") == 1, err
    assert err.startswith(f"error: {folder / component}: its weights are pickles ({pickle_name})") and "refused" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("entry", ["training.train_ldm", "training.train_autoencoder"])
def test_a_missing_dataset_folder_is_one_line_from_each_training_command(entry, tmp_path, capsys):
    import importlib

    from tests.conftest import TINY_AE_CONFIG

    config = TINY_LDM_CONFIG if entry.endswith("ldm") else TINY_AE_CONFIG
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(entry).main(["--config", str(config), f"data.path={tmp_path / 'nowhere'}", f"output_dir={tmp_path / 'o'}"])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and err == f"error: dataset folder '{tmp_path / 'nowhere'}' does not exist (data.path)\n"


def test_prepare_data_names_an_unwritable_output_in_one_line(openmoji_small, tmp_path, capsys):
    from training.prepare_data import main

    (tmp_path / "a-file").write_text("")
    with pytest.raises(SystemExit) as exit_:  # --out under a file: the OS refuses the folder
        main(["parquet", "--src", str(openmoji_small), "--out", str(tmp_path / "a-file" / "sub" / "out")])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and err == f"error: Not a directory: {tmp_path / 'a-file' / 'sub'}\n"


@pytest.mark.parametrize("command", ["evaluate autoencoder", "evaluate pipeline", "app"])
def test_a_missing_model_folder_is_one_line_from_evaluate_and_the_web_page(command, tmp_path, capsys):
    import importlib

    from tests.conftest import error_line

    missing = tmp_path / "nowhere"
    if command == "app":
        argv, module, code = ["--model", str(missing)], "ldm.app", 1
    else:
        what = command.split()[1]
        argv, module, code = [what, "--vae" if what == "autoencoder" else "--model", str(missing), "--data", str(tmp_path)], "training.evaluate", 2
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(module).main(argv)
    assert exit_.value.code == code and str(missing) in error_line(capsys.readouterr().err)

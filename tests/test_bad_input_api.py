"""Bad input through the Python API and the output-directory writers: peftlab's own exceptions with a message
that names the problem and the fix (never an AttributeError or TypeError from deep inside), and nothing that
was there before is lost; directories that merge and export replace are swapped in whole, with normal modes."""
import json
import os
import shutil
import stat

import pytest
import torch
from torch import nn

from peftlab.adapters import (AdapterConfigError, BottleneckConfig, EtherConfig, LoraConfig, OftConfig,
                              config_from_dict)
from peftlab.inject import adapter_names, add_adapter, set_active
from peftlab.io import (AdapterFileError, check_output_dir, export_peft, import_peft, load_adapter,
                        read_adapter_config, refuse_existing, save_adapter, save_merged)
from peftlab.models import load_model, load_tokenizer, tiny_model
from conftest import fail, snapshot


@pytest.fixture(scope="module")
def adapter_dir(model_dir, tmp_path_factory):
    """A small LoRA adapter saved on the tiny checkpoint (its base name is that directory)."""
    model = load_model(str(model_dir))
    add_adapter(model, LoraConfig(r=2, target_modules=("q_proj", "v_proj")), seed=0)
    return save_adapter(model, tmp_path_factory.mktemp("adapter") / "run")


@pytest.fixture
def adapted(model_dir, adapter_dir):
    model = load_model(str(model_dir))
    load_adapter(model, adapter_dir)
    return model


def _old_checkpoint(path):
    """A directory holding other files (an earlier merged checkpoint), with mode 0750."""
    path.mkdir()
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"old weights")
    path.chmod(0o750)
    return path


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


# -- 1. export replaces its directory as merge does ---------------------------------------------------------

def test_export_overwrite_replaces_the_directory(adapted, tmp_path):
    target = _old_checkpoint(tmp_path / "out")
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        export_peft(adapted, target)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
    export_peft(adapted, target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert _mode(target) == 0o750  # the old directory's mode
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary sibling left


def test_failed_export_leaves_the_old_directory(adapted, tmp_path, monkeypatch):
    from peftlab import io

    target = _old_checkpoint(tmp_path / "out")
    before = snapshot(target)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(io, "_atomic_save_tensors", broken)
    with pytest.raises(OSError, match="disk full"):
        export_peft(adapted, target, overwrite=True)
    assert snapshot(target) == before and [p.name for p in tmp_path.iterdir()] == ["out"]


# -- 2. symbolic links and odd output paths ------------------------------------------------------------------

def test_dangling_links_are_refused_naming_the_path(tmp_path):
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for path in (tmp_path / "dangling", tmp_path / "dangling" / "sub"):
        with pytest.raises(FileExistsError, match=f"{tmp_path / 'dangling'} is a symbolic link to "
                                                  f"{tmp_path / 'nowhere'}, which does not exist"):
            check_output_dir(path)
    assert not (tmp_path / "nowhere").exists()


def test_a_link_is_not_replaced(adapted, tmp_path):
    target = _old_checkpoint(tmp_path / "real")
    (tmp_path / "link").symlink_to(target)
    before = snapshot(target)
    with pytest.raises(FileExistsError, match=f"{tmp_path / 'link'} is a symbolic link to {target}: .*"
                                              f"give the directory itself"):
        refuse_existing(tmp_path / "link", overwrite=True)
    for write in (lambda: save_merged(adapted, None, tmp_path / "link", overwrite=True),
                  lambda: export_peft(adapted, tmp_path / "link", overwrite=True)):
        with pytest.raises(FileExistsError, match="is a symbolic link"):
            write()
    assert snapshot(target) == before and (tmp_path / "link").is_symlink()


def test_a_link_to_an_empty_directory_is_written_through(adapted, tmp_path):
    for real, write in (("peft", lambda link: export_peft(adapted, link)),
                        ("merged", lambda link: save_merged(adapted, None, link))):  # failed in rmtree(link)
        (tmp_path / real).mkdir()
        (tmp_path / f"to-{real}").symlink_to(tmp_path / real)
        write(tmp_path / f"to-{real}")
        assert (tmp_path / f"to-{real}").is_symlink() and (tmp_path / real / "config.json").exists() == (real == "merged")
    assert (tmp_path / "peft" / "adapter_config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "peft", "to-merged", "to-peft"]


@pytest.mark.parametrize("command", ["merge", "export"])
def test_commands_refuse_links_before_any_work(adapter_dir, tmp_path, capsys, monkeypatch, command):
    from peftlab import cli

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(cli, "_load_model_and_adapter", never)
    target = _old_checkpoint(tmp_path / "real")
    (tmp_path / "link").symlink_to(target)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    before = snapshot(target)
    line = fail(capsys, [command, "--adapter", str(adapter_dir), "--output", str(tmp_path / "link"), "--overwrite"])
    assert f"{tmp_path / 'link'} is a symbolic link" in line and str(target) in line
    line = fail(capsys, [command, "--adapter", str(adapter_dir), "--output", str(tmp_path / "dangling")])
    assert f"{tmp_path / 'dangling'} is a symbolic link" in line and "remove the link" in line
    assert snapshot(target) == before and sorted(p.name for p in tmp_path.iterdir()) == ["dangling", "link", "real"]


# -- 3. merged checkpoints and adapter files get normal permissions -------------------------------------------

def test_merge_directory_modes(model_dir, adapter_dir, tmp_path, umask_022):
    model = load_model(str(model_dir))
    load_adapter(model, adapter_dir)
    save_merged(model, None, tmp_path / "new")
    assert _mode(tmp_path / "new") == 0o755  # 0o777 & ~umask, as mkdir makes it (mkdtemp gave 0700)
    assert _mode(tmp_path / "new" / "model.safetensors") == 0o644  # safetensors writes 0600
    target = _old_checkpoint(tmp_path / "old")
    model = load_model(str(model_dir))
    load_adapter(model, adapter_dir)
    save_merged(model, load_tokenizer(str(model_dir)), target, overwrite=True)
    assert _mode(target) == 0o750 and (target / "config.json").read_text() != "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "old"]


def test_adapter_files_are_readable_by_others(adapted, tmp_path, umask_022):
    assert _mode(save_adapter(adapted, tmp_path / "run") / "adapter.safetensors") == 0o644
    assert _mode(export_peft(adapted, tmp_path / "peft") / "adapter_model.safetensors") == 0o644


# -- 4. damaged adapter files --------------------------------------------------------------------------------

def _damaged(source, tmp_path, change):
    damaged = tmp_path / "damaged"
    shutil.copytree(source, damaged)
    name = "adapter.json" if (damaged / "adapter.json").is_file() else "adapter_config.json"
    config = json.loads((damaged / name).read_text())
    change(config)
    (damaged / name).write_text(json.dumps(config))
    return damaged


def _lora(c):
    return c["adapters"]["default"]


DAMAGE = {
    "adapter method must be a string": lambda c: _lora(c).update(method=["lora"]),
    "exclude_modules must be": lambda c: _lora(c).update(exclude_modules=5),
    "sibo_targets must be": lambda c: _lora(c).update(sibo_lambda=0.5, sibo_targets=[5]),
    "target_modules must be": lambda c: _lora(c).update(target_modules=[5]),
    "use_rslora must be true or false": lambda c: _lora(c).update(use_rslora="no"),
    "field extra.method.name is a JSON array, expected a string": lambda c: c.update(extra={"method": {"name": ["bitune"]}}),
}


@pytest.mark.parametrize("message", DAMAGE)
def test_damaged_fields_are_adapter_file_errors(adapter_dir, model_dir, tmp_path, capsys, message):
    damaged = _damaged(adapter_dir, tmp_path, DAMAGE[message])
    before = snapshot(damaged)
    with pytest.raises(AdapterFileError, match=message):
        load_adapter(tiny_model(), damaged, check_base_model=False)
    for argv in (["generate", "--model", str(model_dir), "--adapter", str(damaged), "--prompt", "hi"],
                 ["info", "--adapter", str(damaged)]):
        line = fail(capsys, argv)
        assert f"adapter file {damaged / 'adapter.json'}" in line and message in line and "re-save it" in line
    assert snapshot(damaged) == before


def test_damaged_bottleneck_non_linearity(model_dir, tmp_path, capsys):
    model = load_model(str(model_dir))
    add_adapter(model, BottleneckConfig(bottleneck_size=4))
    saved = save_adapter(model, tmp_path / "run")
    damaged = _damaged(saved, tmp_path, lambda c: _lora(c).update(non_linearity=["tanh"]))
    line = fail(capsys, ["info", "--adapter", str(damaged)])
    assert "field adapters.default" in line and "non_linearity must be a string" in line and "re-save it" in line


def test_damaged_peft_type(adapted, tmp_path, capsys):
    damaged = _damaged(export_peft(adapted, tmp_path / "peft"), tmp_path, lambda c: c.update(peft_type=["LORA"]))
    with pytest.raises(AdapterFileError, match="field peft_type is a JSON array, expected a string"):
        import_peft(tiny_model(), damaged)
    assert "peft_type" in fail(capsys, ["generate", "--adapter", str(damaged), "--prompt", "hi"])


def test_reading_a_peft_directory_as_peftlab_names_the_right_tools(adapted, tmp_path):
    peft_dir = export_peft(adapted, tmp_path / "peft")
    with pytest.raises(AdapterFileError) as err:
        read_adapter_config(peft_dir)
    assert "import_peft()" in str(err.value) and "which detect it" not in str(err.value)


# -- 5. the Python API --------------------------------------------------------------------------------------

@pytest.mark.parametrize("make, field", [
    (lambda: LoraConfig(target_modules=5), "target_modules"),
    (lambda: LoraConfig(target_modules=[5]), "target_modules"),
    (lambda: LoraConfig(target_modules=("q_proj", "")), "target_modules"),
    (lambda: LoraConfig(exclude_modules=5), "exclude_modules"),
    (lambda: LoraConfig(exclude_modules=[None]), "exclude_modules"),
    (lambda: LoraConfig(sibo_lambda=0.5, sibo_targets=5), "sibo_targets"),
    (lambda: LoraConfig(sibo_lambda=0.5, sibo_targets=[5]), "sibo_targets"),
    (lambda: BottleneckConfig(non_linearity=["tanh"]), "non_linearity"),
    (lambda: EtherConfig(side=None), "side"),
    (lambda: LoraConfig(use_rslora="no"), "use_rslora"),
    (lambda: EtherConfig(flip_side="yes"), "flip_side"),
    (lambda: OftConfig(coft="no"), "coft"),
    (lambda: LoraConfig(use_rslora=1), "use_rslora"),
    (lambda: config_from_dict({"method": ["lora"]}), "method"),
    (lambda: config_from_dict(["lora"]), "adapter config"),
])
def test_configs_of_the_wrong_type_fail_at_construction(make, field):
    with pytest.raises(AdapterConfigError, match=field):
        make()


def test_single_names_are_one_name():
    config = LoraConfig(exclude_modules="q_proj", target_modules=("q_proj", "v_proj"))
    assert config.exclude_modules == ("q_proj",)
    model = tiny_model()
    assert all(t.endswith("v_proj") for t in add_adapter(model, config))


def test_add_adapter_takes_a_dict_and_refuses_other_configs():
    model = tiny_model()
    add_adapter(model, {"method": "lora", "r": 2, "target_modules": ["q_proj"]})
    assert adapter_names(model) == ["default"]
    for config, hint in ((None, "got None"), (LoraConfig, "an instance"), ("lora", "got 'lora'")):
        with pytest.raises(AdapterConfigError, match=f"config must be an AdapterConfig .*{hint}"):
            add_adapter(model, config, name="other")
    with pytest.raises(AdapterConfigError, match="unknown lora option"):
        add_adapter(model, {"method": "lora", "rank": 2}, name="other")
    assert adapter_names(model) == ["default"]


@pytest.mark.parametrize("name", [5, None, "", "a.b", ("a",)])
def test_adapter_names_must_be_strings(name):
    model = tiny_model()
    with pytest.raises(AdapterConfigError, match="adapter name .* must be a non-empty string"):
        add_adapter(model, LoraConfig(), name=name)
    assert adapter_names(model) == []


def test_a_single_string_is_one_adapter_name(adapter_dir):
    model = tiny_model(seed=0)
    add_adapter(model, LoraConfig(target_modules=("q_proj",)), name="default")
    add_adapter(model, LoraConfig(target_modules=("q_proj",)), name="other")
    set_active(model, "default")
    assert model.model.layers[0].self_attn.q_proj.active == ("default",)
    with pytest.raises(AdapterConfigError, match="adapter names must be strings"):
        set_active(model, [5])
    fresh = tiny_model(seed=0)
    load_adapter(fresh, adapter_dir, names="default", check_base_model=False)
    assert adapter_names(fresh) == ["default"]


def test_plain_modules_without_a_config(tmp_path, adapter_dir):
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    add_adapter(model, LoraConfig(r=2))
    with pytest.raises(AdapterFileError, match="save_adapter needs a transformers model"):
        save_adapter(model, tmp_path / "plain")
    assert not (tmp_path / "plain").exists()
    with pytest.raises(AdapterFileError, match="pass check_base_model=False"):
        load_adapter(nn.Sequential(nn.Linear(4, 4)), adapter_dir)
    with pytest.raises(AdapterFileError, match="does not fit this model"):
        load_adapter(nn.Sequential(nn.Linear(4, 4)), adapter_dir, check_base_model=False)
    assert torch.is_tensor(model[0].weight)

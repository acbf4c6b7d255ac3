"""Loading an SAE folder never imports code the folder names (issue 15), unless the user opts in."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch

import saelab.saes.registry as registry
from saelab.cli import main
from saelab.errors import FileFormatError
from saelab.saes.saelens_format import load_sae, save_sae
from saelab.training.trainer import build_sae

USER_SAE = textwrap.dedent("""
    import torch
    from saelab.saes import SAE, register_sae

    @register_sae("user_relu_test")
    class UserSAE(SAE):
        def encode(self, x_BD):
            return torch.relu(self.pre_acts(x_BD))

        def train_forward(self, x_BD, ctx):
            raise NotImplementedError
""")


@pytest.fixture
def user_code(tmp_path, monkeypatch):
    """A folder on sys.path with `marker_mod` (writes a marker file when imported) and `user_mod`
    (a valid SAE class); registry and sys.modules are restored afterwards."""
    code = tmp_path / "code"
    code.mkdir()
    marker = tmp_path / "imported.marker"
    (code / "marker_mod.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nSAE = object\n")
    (code / "user_mod.py").write_text(USER_SAE)
    monkeypatch.syspath_prepend(str(code))
    registry.load_builtin_architectures()
    before = dict(registry.SAE_REGISTRY)
    yield code, marker
    registry.SAE_REGISTRY.clear()
    registry.SAE_REGISTRY.update(before)
    for name in [m for m in sys.modules if m in ("marker_mod", "user_mod") or m.startswith("saelab_user_arch_user")]:
        del sys.modules[name]


def _folder_naming(tmp_path, architecture, metadata=None):
    """A valid saved SAE whose cfg.json names `architecture`."""
    folder = tmp_path / "sae"
    torch.manual_seed(0)
    save_sae(build_sae("standard", d_in=6, d_sae=12), folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["architecture"] = architecture
    if metadata is not None:
        cfg["metadata"] = metadata
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def test_a_cfg_naming_a_module_is_refused_without_importing_it(user_code, tmp_path):
    _, marker = user_code
    folder = _folder_naming(tmp_path, "marker_mod:SAE")
    with pytest.raises(FileFormatError) as err:
        load_sae(folder)
    message = str(err.value)
    assert str(folder / "cfg.json") in message and "'marker_mod:SAE'" in message
    assert "--arch module:Class" in message and "--trust-code" in message and "\n" not in message
    assert not marker.exists() and "marker_mod" not in sys.modules


def test_this_module_is_refused(tmp_path, capsys):
    already = "this" in sys.modules
    with pytest.raises(FileFormatError, match="not a registered saelab architecture"):
        load_sae(_folder_naming(tmp_path, "this:SAE"))
    assert "Beautiful is better than ugly" not in capsys.readouterr().out
    assert ("this" in sys.modules) == already


def test_a_metadata_class_is_not_imported_either(user_code, tmp_path):
    _, marker = user_code
    folder = _folder_naming(tmp_path, "some_unregistered_name", metadata={"saelab_class": "marker_mod:SAE"})
    with pytest.raises(FileFormatError, match="saved from 'marker_mod:SAE'"):
        load_sae(folder)
    assert not marker.exists()


def test_trust_code_imports_the_named_class(user_code, tmp_path):
    folder = _folder_naming(tmp_path, "user_mod:UserSAE")
    sae = load_sae(folder, trust_code=True)
    assert type(sae).__name__ == "UserSAE" and type(sae).__module__ == "user_mod"


def test_trust_code_on_a_class_that_is_not_an_sae_is_a_clear_error(user_code, tmp_path):
    _, marker = user_code
    with pytest.raises(FileFormatError, match="not a subclass of saelab.saes.SAE"):
        load_sae(_folder_naming(tmp_path, "marker_mod:SAE"), trust_code=True)
    assert marker.exists()  # the user said to run it


@pytest.mark.parametrize("how", ["module", "file", "class"])
def test_arch_override_loads_the_folder_as_the_users_class(user_code, tmp_path, how):
    code, _ = user_code
    folder = _folder_naming(tmp_path, "user_relu_test")
    with pytest.raises(FileFormatError):
        load_sae(folder)
    if how == "class":
        import importlib

        arch = importlib.import_module("user_mod").UserSAE
    else:
        arch = "user_mod:UserSAE" if how == "module" else f"{code / 'user_mod.py'}:UserSAE"
    sae = load_sae(folder, arch=arch)
    assert type(sae).__name__ == "UserSAE"
    reference = load_sae(_folder_naming(tmp_path / "ref", "standard"))
    x = torch.randn(16, 6)
    torch.testing.assert_close(sae(x), reference(x))


def test_a_saved_user_sae_names_its_class_and_loads_again_only_with_opt_in(user_code, tmp_path):
    import importlib

    cls = importlib.import_module("user_mod").UserSAE
    torch.manual_seed(0)
    sae = cls(cls.config_class(d_in=6, d_sae=12))
    save_sae(sae, tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    assert cfg["architecture"] == "user_relu_test" and cfg["metadata"]["saelab_class"] == "user_mod:UserSAE"
    assert type(load_sae(tmp_path / "s")) is cls  # registered in this process: loads by name
    # A fresh process: nothing registered, nothing imported.
    registry.SAE_REGISTRY.pop("user_relu_test")
    del sys.modules["user_mod"]
    with pytest.raises(FileFormatError, match="saved from 'user_mod:UserSAE'"):
        load_sae(tmp_path / "s")
    loaded = load_sae(tmp_path / "s", trust_code=True)
    x = torch.randn(8, 6)
    torch.testing.assert_close(loaded(x), sae(x))


def test_cli_eval_refuses_in_one_line_and_loads_with_trust_code(user_code, tmp_path, capsys, tiny_synthetic_model_dir):
    _, marker = user_code
    folder = tmp_path / "sae"
    torch.manual_seed(0)
    save_sae(build_sae("standard", d_in=24, d_sae=32), folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "architecture": "user_mod:UserSAE"}))
    args = ["eval", "--sae", str(folder), "--data", str(tiny_synthetic_model_dir), "--samples", "2k", "--json"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1
    assert "--trust-code" in err and "user_mod" not in sys.modules
    for opt_in in (["--trust-code"], ["--arch", "user_mod:UserSAE"]):
        with pytest.raises(SystemExit) as exit_info:
            main(args + opt_in)
        captured = capsys.readouterr()
        assert exit_info.value.code in (0, None), captured.err
        assert json.loads(captured.out.strip().splitlines()[-1])["l0"] > 0
    assert not marker.exists()

"""``--model-class`` runs no code from flags: only a ``torch.nn.Module``
subclass defined in the named module is built, checked before it is
called, and a module that does not define the class is not imported."""
import subprocess
import sys
import textwrap

import pytest
import torch

from test_cli import run_cli, subprocess_env


def sample_argv(tmp_path, model_class, arch):
    return ["sample", "--format", "flow_matching", "--model-class", model_class,
            "--arch", arch, "--latent-shape", 3, "--checkpoint",
            tmp_path / "fm.pt", "--n", 2, "--out", tmp_path / "s.pt",
            "--no-progress"]


@pytest.fixture
def checkpoint(tmp_path):
    torch.save({"model": {}}, tmp_path / "fm.pt")
    return tmp_path / "fm.pt"


def test_popen_and_os_system_are_refused_before_they_run(tmp_path, checkpoint,
                                                         capsys):
    marker = tmp_path / "ran"
    cases = [
        ("subprocess:Popen", f'{{"args": "touch {marker}", "shell": true}}',
         "is not a torch.nn.Module subclass"),
        ("os:system", f'{{"command": "touch {marker}"}}', "not a class"),
        ("builtins:eval", '{"source": "1"}', "not a class"),
        ("torch.nn:Linear", '{"in_features": 3, "out_features": 3}',
         "defined in 'torch.nn.modules.linear', not in 'torch.nn'"),
        ("os.system", "{}", "must be MODULE:CLASS"),
        ("os:path.join", "{}", "not a class"),
        ("../evil:Net", "{}", "must be MODULE:CLASS"),
    ]
    for model_class, arch, fragment in cases:
        code, err = run_cli(capsys, *sample_argv(tmp_path, model_class, arch))
        assert code == 1 and len(err) == 1 and fragment in err[0], (model_class, err)
        assert not marker.exists(), model_class
    assert not (tmp_path / "s.pt").exists()


def test_module_code_runs_only_for_a_class_it_defines(tmp_path, checkpoint,
                                                      capsys, monkeypatch):
    imported, built = tmp_path / "imported", tmp_path / "built"
    (tmp_path / "side_effect_mod.py").write_text(textwrap.dedent(f"""\
        from pathlib import Path
        from torch.nn import Linear          # re-exported, not defined here
        Path({str(imported)!r}).touch()

        class Plain:                         # a class, but not a network
            def __init__(self, **kwargs):
                Path({str(built)!r}).touch()
        """))
    monkeypatch.chdir(tmp_path)      # the working folder is on the path
    # no class statement for the name: refused, and the module never ran
    for name, fragment in [("Missing", "no class statement for 'Missing'"),
                           ("Linear", "no class statement for 'Linear'"),
                           ("Path", "no class statement for 'Path'")]:
        code, err = run_cli(capsys, *sample_argv(
            tmp_path, f"side_effect_mod:{name}", "{}"))
        assert code == 1 and len(err) == 1 and fragment in err[0], (name, err)
        assert not imported.exists() and "side_effect_mod" not in sys.modules
    # a class that is no Module: imported (as the help says), never called
    try:
        code, err = run_cli(capsys, *sample_argv(tmp_path, "side_effect_mod:Plain",
                                                 "{}"))
        assert code == 1 and len(err) == 1, err
        assert "'side_effect_mod:Plain' is not a torch.nn.Module subclass" in err[0]
        assert imported.exists() and not built.exists()
    finally:
        sys.modules.pop("side_effect_mod", None)
    assert str(tmp_path) not in sys.path      # the path is restored


NET = textwrap.dedent("""\
    import torch

    class Net(torch.nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.lin = torch.nn.Linear(dim, dim)
        def forward(self, x, t):
            return self.lin(x) * t
    """)


@pytest.mark.parametrize("entry", ["module", "script"])
def test_a_class_in_the_working_folder_loads_under_both_entry_points(tmp_path,
                                                                     entry):
    work = tmp_path / "work"
    work.mkdir()
    (work / "my_net_here.py").write_text(NET)
    sys.path.insert(0, str(work))
    try:
        import my_net_here
        torch.manual_seed(0)
        torch.save({"model": my_net_here.Net(3).state_dict()}, work / "fm.pt")
    finally:
        sys.path.remove(str(work))
        sys.modules.pop("my_net_here", None)
    if entry == "module":
        command = [sys.executable, "-m", "flowjac"]
    else:       # what pip writes as the ``flowjac`` console script
        script = tmp_path / "bin" / "flowjac"
        script.parent.mkdir()
        script.write_text("import sys\nfrom flowjac.cli import main\n"
                          "if __name__ == '__main__':\n    sys.exit(main())\n")
        command = [sys.executable, str(script)]
    proc = subprocess.run(
        command + ["sample", "--format", "flow_matching", "--model-class",
                   "my_net_here:Net", "--arch", '{"dim": 3}', "--latent-shape",
                   "3", "--checkpoint", "fm.pt", "--n", "2", "--out", "s.pt",
                   "--no-progress"], cwd=work, capture_output=True, text=True,
        env=subprocess_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    x = torch.load(work / "s.pt", weights_only=True)["x"]
    assert x.shape == (2, 3) and torch.isfinite(x).all()

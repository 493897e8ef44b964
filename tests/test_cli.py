"""What every command shares on the command line (cache/flags.py): a bad flag is one line and
exit 2 before any work; and `python -m heads` names the heads commands instead of running one."""
import importlib

import pytest

from conftest import run_cli

BAD_FLAGS = {  # command: arguments with one bad flag, the words the line must hold
    "extract": (["--data-dir", "x", "--image-size", "9"], "outside [32, 4096]"),
    "cache": (["frobnicate"], "invalid choice"),
    "heads.train": (["--bootstrap", "0"], "outside [1, 100000]"),
    "heads.baseline": (["--max-iter", "0"], "outside [1, 1000000]"),
    "heads.compare": (["a", "b", "--bootstrap", "100000000"], "outside [1, 100000]"),
    "heads.predict": (["--run", "r", "x.png", "--batch-size", "0"], "outside [1, inf)"),
    "heads.runs": (["--sort-by-test"], "unrecognized arguments"),
    "search": (["--trials", "0"], "outside [1, inf)"),
}


@pytest.mark.parametrize("command", sorted(BAD_FLAGS))
def test_a_bad_flag_is_one_line_in_every_command(command, capsys):
    arguments, expected = BAD_FLAGS[command]
    entry = importlib.import_module(command if "." in command else f"{command}.__main__")
    with pytest.raises(SystemExit) as stopped:
        entry.get_args_parser().parse_args(arguments)
    message = capsys.readouterr().err
    assert stopped.value.code == 2 and message.count("\n") == 1 and expected in message
    assert message.startswith(f"python -m {command}: error: ")


def test_python_m_heads_lists_the_commands_and_runs_none(tmp_path):
    result = run_cli("heads", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and result.stdout == ""
    for command in ("heads.train", "heads.baseline", "heads.compare", "heads.predict", "heads.runs"):
        assert f"python -m {command}" in result.stderr
    assert "heads.training" not in result.stderr  # a library module, not a command
    assert list(tmp_path.iterdir()) == []  # nothing trained, nothing written

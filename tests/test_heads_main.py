"""`python -m heads` names the heads commands instead of running one of them."""
from conftest import run_cli


def test_python_m_heads_lists_the_commands_and_runs_none(tmp_path):
    result = run_cli("heads", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and result.stdout == ""
    for command in ("heads.train", "heads.baseline", "heads.compare", "heads.predict"):
        assert f"python -m {command}" in result.stderr
    assert list(tmp_path.iterdir()) == []  # nothing trained, nothing written

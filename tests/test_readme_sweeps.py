"""The README's second half in its own fresh clone, beside tests/test_readme.py's (which explains the rules): the
sweeps, their summary, QLoRA, the cluster previews, a run from another folder, and the tracking commands, in README
order. The clone is set up as a user does, with the README's `bash scripts/setup.sh`."""

from __future__ import annotations

import pytest
from test_readme import ELSEWHERE, SECOND, clone_fixture, run_from_another_folder, run_readme_command

clone = clone_fixture("readme2", setup=True)


@pytest.mark.slow
@pytest.mark.parametrize("command", SECOND)
def test_readme_command(command, clone, record_property):
    run_readme_command(command, clone, record_property)


@pytest.mark.slow
@pytest.mark.parametrize("command", [c for c in ELSEWHERE if c in SECOND])
def test_readme_command_from_another_folder(command, clone, tmp_path, record_property):
    run_from_another_folder(command, clone, tmp_path, record_property)

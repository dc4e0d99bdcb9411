"""The README's second half in its own fresh clone, beside tests/test_readme.py's (which explains the rules): the
sweeps, their summary, QLoRA, the cluster previews, a run from another folder (the README's `cd "$(mktemp -d)"`
line), and the tracking commands, in README order. The clone is set up as a user does, with the README's
`bash scripts/setup.sh`."""

from __future__ import annotations

import pytest
from test_readme import SECOND, clone_fixture, run_readme_command

clone = clone_fixture("readme2", setup=True)


@pytest.mark.slow
@pytest.mark.parametrize("command", SECOND)
def test_readme_command(command, clone, record_property):
    run_readme_command(command, clone, record_property)

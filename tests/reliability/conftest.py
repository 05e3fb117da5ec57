"""Fixtures shared by the reliability modules: a tiny finetune project and one uninterrupted stage run on it."""

from __future__ import annotations

import sys

import pytest
from reliability_helpers import FINETUNE, make_ft_project, project_copy, run_ok


@pytest.fixture(scope="session")
def ft_project(tmp_path_factory, tiny_random_dir):
    """Template project for stages/finetune.py (copy it before running anything in it)."""
    return make_ft_project(tmp_path_factory.mktemp("rel_ft_template") / "p", tiny_random_dir)


@pytest.fixture(scope="session")
def clean_run(ft_project, tmp_path_factory):
    """The project after one uninterrupted `python stages/finetune.py --client c1`."""
    proj = project_copy(ft_project, tmp_path_factory.mktemp("rel_ft_clean") / "p")
    run_ok([sys.executable, *FINETUNE], proj)
    return proj

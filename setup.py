"""Everything is configured in pyproject.toml; this file only ships ``peftlab-lm-eval.pth`` at the top
of site-packages (it registers ``--model peftlab`` with lm-eval's command line: see
peftlab/evaluation/lm_eval_hook.py). Editable installs skip files outside packages, so the Makefile
copies it there after ``pip install -e``."""
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "peftlab-lm-eval.pth"


class BuildWithPth(build_py):
    def run(self):
        super().run()
        self.copy_file(PTH, str(Path(self.build_lib) / PTH))

    def get_outputs(self, include_bytecode=1):
        return super().get_outputs(include_bytecode) + [str(Path(self.build_lib) / PTH)]


setup(cmdclass={"build_py": BuildWithPth})

"""The paper's grid: training level 0-4 and mixed x size 60, 240, 1920, all x seeds.

Start from a model config and widen its grid:
`python -m jaxsft.run --config=configs/paper_grid.py --config.model.path=<checkpoint>`.
"""

from jaxsft import config


def get_config():
    c = config.default_config()
    c.data.relations = "all"
    c.grid.levels = ("0", "1", "2", "3", "4", "mixed")
    c.grid.sizes = ("60", "240", "1920", "all")
    c.grid.seeds = (0, 1, 2)
    return c

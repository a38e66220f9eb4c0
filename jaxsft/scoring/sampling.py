"""The sampling scorer: the paper's protocol.

Each template's prompt is prefilled once and `num_samples` completions share its KV cache; they
are sampled at temperature T (top-k / top-p optional), at most `max_new_tokens` tokens, ending at
EOS or a newline. A completion hits when its normalised text contains the normalised object or an
alias (`answers.contains_answer`). Each (fact, template) draws from its own key, derived from the
seed, the fact id and the template index, so results do not depend on batching or on the subset.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from jaxsft import batching, generate, tokenization
from jaxsft.data import answers as answers_lib
from jaxsft.data import templates as templates_lib
from jaxsft.models import Decoder


def row_id(fact_id: str, template_index: int) -> int:
    """A stable 31-bit id of one (fact, template): its samples' key is `fold_in(seed, row_id)`."""
    return zlib.crc32(f"{fact_id}/{template_index}".encode()) & 0x7FFFFFFF


def completion_text(tokenizer, tokens: Sequence[int]) -> str:
    """The completion as the protocol reads it: decoded, up to the first newline."""
    return tokenizer.decode(list(tokens), skip_special_tokens=True).split("\n", 1)[0]


def template_hit_rates(model: Decoder, tokenizer, facts: Sequence[Mapping], *, temperature: float,
                       num_samples: int, max_new_tokens: int, batch_size: int, buckets: Sequence[int],
                       top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                       templates: Mapping[str, Sequence[str]] | None = None,
                       progress: Callable[[float], None] | None = None,
                       outputs: list | None = None) -> np.ndarray:
    """Share of hits among each template's samples: float64 [facts, templates].

    `facts` need `id`, `subject`, `relation`, `answers`. `outputs`, when given, receives the
    completions: one list of `num_samples` strings per (fact, template), facts-major.
    """
    templates = templates if templates is not None else templates_lib.completion_templates()
    bos, eos = tokenization.special_tokens(tokenizer)
    head = [] if bos is None else [bos]
    cells, prompts = [], []
    for f, fact in enumerate(facts):
        for j, template in enumerate(templates[fact["relation"]]):
            cells.append((f, j))
            prompts.append(template_prompt(tokenizer, head, templates_lib.fill(template, fact["subject"])))
    stop = generate.stop_token_table(tokenizer, [eos])
    num_templates = max(len(t) for t in templates.values())
    rates = np.zeros((len(facts), num_templates))
    texts: list[list[str]] = [[] for _ in prompts]
    # Sorted by length, one generate call per batch: buckets are as full as they can be, and the
    # progress bar moves batch by batch.
    order = sorted(range(len(prompts)), key=lambda i: (batching.bucket_length(len(prompts[i]), buckets), i))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        samples = generate.generate(
            model, [prompts[i] for i in idx], stop_table=stop, max_new_tokens=max_new_tokens, buckets=buckets,
            batch_size=batch_size, temperature=temperature, top_k=top_k, top_p=top_p, num_samples=num_samples,
            seed=seed, row_ids=[row_id(facts[cells[i][0]]["id"], cells[i][1]) for i in idx])
        for i, rows in zip(idx, samples):
            f, j = cells[i]
            texts[i] = [completion_text(tokenizer, row) for row in rows]
            rates[f, j] = np.mean([answers_lib.contains_answer(t, facts[f]["answers"]) for t in texts[i]])
        if progress is not None:
            progress(len(idx) / num_templates)
    if outputs is not None:
        outputs.extend(texts)
    return rates


def template_prompt(tokenizer, head: list[int], prompt: str) -> list[int]:
    """Prompt ids as the likelihood scorer sees them: BOS, then the text without special tokens."""
    return head + tokenizer.encode(prompt, add_special_tokens=False)

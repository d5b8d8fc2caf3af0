"""What a pool's requests must stream: the same requests served whole by one in-process engine."""

from __future__ import annotations

from tokenfactory.engine.config import EngineConfig
from tokenfactory.engine.engine import EngineCore
from tokenfactory.engine.request import Request, SamplingParams


def served_whole(config: EngineConfig, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    """Each prompt's output tokens from one `EngineCore` serving them all at once."""
    core = EngineCore(config)
    for i, prompt in enumerate(prompts):
        core.add_request(Request(str(i), prompt, params))
    tokens: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while core.has_work():
        for out in core.step():
            tokens[out.request_id].extend(out.new_token_ids)
    return [tokens[str(i)] for i in range(len(prompts))]

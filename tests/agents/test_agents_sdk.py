"""The OpenAI Agents SDK, unchanged, runs an agent with a function tool against a live server.

The tiny model has random weights, so the first turn must call a tool (tool_choice `required`
constrains decoding to a valid call) and the run ends with that tool's result
(`stop_on_first_tool`); greedy decoding makes the run the same every time."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

import jsonschema
import pytest
from pydantic import Field

agents = pytest.importorskip("agents")

from agents import (  # noqa: E402  (after the skip)
    Agent,
    ModelSettings,
    OpenAIChatCompletionsModel,
    Runner,
    ToolCallItem,
    function_tool,
    set_tracing_disabled,
)
from openai import AsyncOpenAI  # noqa: E402

from tests.gateway.live_server import API_KEY, LiveServer, gateway_config  # noqa: E402


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    live = LiveServer(gateway_config(tiny_model_dir), api_keys=[API_KEY]).start()
    yield live
    live.stop()


def make_agent(server: LiveServer, calls: list[tuple[int, int]]) -> Agent:
    @function_tool
    def add(a: Annotated[int, Field(ge=0, le=99)], b: Annotated[int, Field(ge=0, le=99)]) -> int:
        """Add two numbers."""
        calls.append((a, b))
        return a + b

    client = AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
    return Agent(
        name="adder",
        instructions="Use the add tool.",
        tools=[add],
        model=OpenAIChatCompletionsModel(model=server.model, openai_client=client),
        model_settings=ModelSettings(tool_choice="required", parallel_tool_calls=False, temperature=0.0,
                                     max_tokens=48),
        tool_use_behavior="stop_on_first_tool",
    )


@pytest.mark.parametrize("streamed", [False, True])
def test_an_agent_calls_its_function_tool_and_finishes(server, streamed):
    set_tracing_disabled(True)
    calls: list[tuple[int, int]] = []
    agent = make_agent(server, calls)

    async def run():
        if not streamed:
            return await Runner.run(agent, "What is 2 + 3?", max_turns=2)
        result = Runner.run_streamed(agent, "What is 2 + 3?", max_turns=2)
        async for _ in result.stream_events():
            pass
        return result

    result = asyncio.run(run())
    (tool,) = agent.tools
    (item,) = [i for i in result.new_items if isinstance(i, ToolCallItem)]
    arguments = json.loads(item.raw_item.arguments)
    jsonschema.validate(arguments, tool.params_json_schema)
    assert item.raw_item.name == "add" and calls == [(arguments["a"], arguments["b"])]
    assert result.final_output == str(arguments["a"] + arguments["b"])

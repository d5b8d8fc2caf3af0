"""Chat and text completions: OpenAI request -> engine sequences -> OpenAI response or SSE stream.

All text work happens here, in the gateway process: chat templates, tokenization, incremental
detokenization, stop strings, logprob formatting. The worker sees only token ids. Each OpenAI
choice is one engine sequence; `n` choices of one prompt are `n` sequences sharing the prompt,
so the prefix cache computes it once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi.responses import Response
from pydantic import BaseModel
from starlette.types import Receive, Scope, Send

from tokenfactory.agents.tool_calls import (
    HERMES_OPEN,
    Event,
    ToolCall,
    ToolCallParser,
    ToolFormat,
    parse_tool_calls,
    tool_call_lark,
)
from tokenfactory.agents.tools import (
    ToolPlan,
    ToolRequestError,
    check_tool_messages,
    plan_tools,
    render_without_template_support,
)
from tokenfactory.control.tiers import TokenUsage
from tokenfactory.engine.grammar import GrammarError, json_schema_grammar, lark_grammar
from tokenfactory.engine.outputs import TokenLogprobs
from tokenfactory.engine.request import SamplingParams
from tokenfactory.engine.text import TextStream
from tokenfactory.engine.tokenizer import Tokenizer, TokenizerError
from tokenfactory.gateway.errors import APIError, ClientDisconnected, bad_request, engine_unavailable, model_not_found
from tokenfactory.gateway.metering import RequestAccount
from tokenfactory.gateway.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    FunctionCall,
    FunctionCallDelta,
    PromptTokensDetails,
    SamplingFields,
    ToolCallDelta,
    ToolCallOut,
    TopLogprob,
    Usage,
    now_s,
    random_id,
)
from tokenfactory.runtime.client import EngineDeadError, RequestRejectedError, Worker, cancel_and_wait

T = TypeVar("T")


Disconnected = Callable[[], Awaitable[bool]]
"""Asks whether the HTTP client has gone away (Starlette's `Request.is_disconnected`)."""

DISCONNECT_POLL_S = 0.25
"""How often a full-response request checks that its client is still there."""


@dataclass(slots=True)
class SequenceSpec:
    """One engine sequence behind one OpenAI choice."""

    index: int
    prompt_index: int
    prompt_token_ids: list[int]
    params: SamplingParams
    session_id: str | None = None
    """The conversation this request belongs to (routers may keep a session on one worker)."""


@dataclass(slots=True)
class Delta:
    """What one engine step added to one choice, as text."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs]
    finish_reason: str | None
    num_cached_tokens: int


@dataclass(slots=True)
class ChoiceTotals:
    """A choice accumulated over its deltas (for full responses and usage)."""

    prompt_index: int
    text: list[str] = field(default_factory=list)
    num_tokens: int = 0
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    num_cached_tokens: int = 0

    def add(self, delta: Delta) -> None:
        self.text.append(delta.text)
        self.num_tokens += len(delta.token_ids)
        self.logprobs.extend(delta.logprobs)
        self.finish_reason = delta.finish_reason or self.finish_reason
        self.num_cached_tokens = max(self.num_cached_tokens, delta.num_cached_tokens)


class OpenAIServing:
    """The handlers behind /v1/chat/completions and /v1/completions for one served model."""

    def __init__(self, worker: Worker, tokenizer: Tokenizer, model_name: str, context_len: int) -> None:
        self.worker = worker
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.context_len = context_len
        templates = "".join(tokenizer.chat_templates.values())
        self.tool_format = ToolFormat.for_template(templates)
        self.template_knows_tools = "tools" in templates
        self.tool_tags_are_tokens = tokenizer.token_to_id(HERMES_OPEN) is not None

    # ------------------------------------------------------------------ chat

    async def chat(
        self, req: ChatCompletionRequest, account: RequestAccount, is_disconnected: Disconnected | None = None,
        session_id: str | None = None,
    ) -> Response:
        self._check_model(req.model)
        messages = [m.for_template() for m in req.messages]
        try:
            plan = plan_tools(req.tools, req.tool_choice)
            check_tool_messages(messages)
        except ToolRequestError as e:
            raise bad_request(str(e), param=e.param) from None
        grammar = self._output_grammar(req, plan)
        tools = req.tools
        if not self.template_knows_tools and (tools or any(m["role"] == "tool" for m in messages)):
            messages, tools = render_without_template_support(messages, tools), None
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tools=tools)
        except TokenizerError as e:
            raise bad_request(str(e), param="messages") from None
        prompt = self.tokenizer.encode(text, add_special_tokens=False)
        seqs = self._sequences(req, [prompt], req.max_output_tokens, "messages", grammar, session_id)
        rid, created = random_id("chatcmpl"), now_s()
        if req.stream:
            return _sse(self._stream_chat(req, account, rid, created, seqs, plan))
        totals = await self._collect(seqs, account, rid, is_disconnected)
        choices = []
        for i, t in enumerate(totals):
            content, calls = "".join(t.text), []
            if plan.parse_calls:
                content, calls = parse_tool_calls(content)
                content = content or (None if calls else "")
            choices.append(ChatChoice(
                index=i,
                message=AssistantMessage(content=content, tool_calls=[_call_out(c) for c in calls] or None),
                logprobs=self._chat_logprobs(t.logprobs) if req.logprobs else None,
                finish_reason=_finish_reason(t.finish_reason, len(calls)),
            ))
        body = ChatCompletionResponse(id=rid, created=created, model=self.model_name, choices=choices,
                                      usage=_usage(seqs, totals, account), service_tier=account.tier)
        return _json_response(body)

    async def _stream_chat(
        self, req: ChatCompletionRequest, account: RequestAccount, rid: str, created: int, seqs: list[SequenceSpec],
        plan: ToolPlan,
    ) -> AsyncIterator[str]:
        def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
            c = ChatCompletionChunk(id=rid, created=created, model=self.model_name, choices=choices, usage=usage,
                                    service_tier=account.tier)
            return _model_event(c, exclude=None if req.include_usage else {"usage"})

        totals = [ChoiceTotals(s.prompt_index) for s in seqs]
        with _ledger_guard(account, rid, seqs, totals):
            # The role chunks go out with the first delta, not before it: no byte of the response
            # leaves before the engine has the request (`EventStream`).
            roles = [ChatChunkChoice(index=s.index, delta=DeltaMessage(role="assistant", content="")) for s in seqs]
            # With tools, each choice's text goes through a parser that tells content from calls
            # as the tokens arrive: content streams as content, calls as `tool_calls` deltas.
            parsers = [ToolCallParser() for _ in seqs] if plan.parse_calls else None
            async for d in self._run_metered(seqs, totals, account, rid):
                for role in roles:
                    yield chunk([role])
                roles = []
                logprobs = self._chat_logprobs(d.logprobs) if req.logprobs else None
                if parsers is None:
                    deltas, finish = [DeltaMessage(content=d.text)] if d.text else [], d.finish_reason
                else:
                    parser = parsers[d.index]
                    events = parser.push(d.text) + (parser.finish() if d.finish_reason else [])
                    deltas = [_delta_message(e) for e in events]
                    finish = _finish_reason(d.finish_reason, parser.num_calls)
                if not deltas and (finish or logprobs):
                    deltas = [DeltaMessage()]
                for k, delta in enumerate(deltas):  # logprobs ride on the first, the finish on the last
                    yield chunk([ChatChunkChoice(index=d.index, delta=delta, logprobs=None if k else logprobs,
                                                 finish_reason=finish if k == len(deltas) - 1 else None)])
            if req.include_usage:
                yield chunk([], _usage(seqs, totals, account))

    def _output_grammar(self, req: ChatCompletionRequest, plan: ToolPlan) -> str | None:
        """The grammar decoding must follow: forced tool calls, else the response format, else none."""
        param = "tools"
        try:
            if plan.forced:
                return lark_grammar(tool_call_lark(plan.forced, self.tool_format, req.parallel_tool_calls,
                                                   self.tool_tags_are_tokens))
            param = "response_format"
            fmt = req.response_format
            if fmt is None or fmt.type == "text":
                return None
            if fmt.type == "json_object":
                return json_schema_grammar(None)
            if fmt.json_schema is None or fmt.json_schema.schema_ is None:
                raise GrammarError("response_format json_schema needs json_schema.schema")
            return json_schema_grammar(fmt.json_schema.schema_)
        except GrammarError as e:
            raise bad_request(f"invalid JSON schema in {param}: {e}", param=param) from None

    def _chat_logprobs(self, logprobs: list[TokenLogprobs]) -> ChatLogprobs:
        def top(token_id: int, logprob: float) -> TopLogprob:
            token = self.tokenizer.decode([token_id], skip_special_tokens=False)
            return TopLogprob(token=token, logprob=logprob, bytes=list(token.encode()))

        content = []
        for lp in logprobs:
            chosen = top(lp.chosen.token_id, lp.chosen.logprob)
            alternatives = [top(t.token_id, t.logprob) for t in lp.top]
            content.append(ChatTokenLogprob(**chosen.model_dump(), top_logprobs=alternatives))
        return ChatLogprobs(content=content)

    # ------------------------------------------------------------------ completions

    async def completions(
        self, req: CompletionRequest, account: RequestAccount, is_disconnected: Disconnected | None = None,
        session_id: str | None = None,
    ) -> Response:
        self._check_model(req.model)
        prompts = self._completion_prompts(req.prompt)
        seqs = self._sequences(req, prompts, req.max_output_tokens, "prompt", session_id=session_id)
        echoes = [self.tokenizer.decode(p) if req.echo else "" for p in prompts]
        rid, created = random_id("cmpl"), now_s()
        if req.stream:
            return _sse(self._stream_completions(req, account, rid, created, seqs, echoes))
        totals = await self._collect(seqs, account, rid, is_disconnected)
        choices = []
        for i, t in enumerate(totals):
            echo = echoes[t.prompt_index]
            logprobs = self._completion_logprobs(t.logprobs, len(echo)) if req.logprobs is not None else None
            choices.append(CompletionChoice(index=i, text=echo + "".join(t.text), logprobs=logprobs,
                                            finish_reason=t.finish_reason))
        body = CompletionResponse(id=rid, created=created, model=self.model_name, choices=choices,
                                  usage=_usage(seqs, totals, account), service_tier=account.tier)
        return _json_response(body)

    async def _stream_completions(
        self, req: CompletionRequest, account: RequestAccount, rid: str, created: int, seqs: list[SequenceSpec],
        echoes: list[str],
    ) -> AsyncIterator[str]:
        def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
            c = CompletionResponse(id=rid, created=created, model=self.model_name, choices=choices, usage=usage,
                                   service_tier=account.tier)
            return _model_event(c, exclude=None if req.include_usage else {"usage"})

        totals = [ChoiceTotals(s.prompt_index) for s in seqs]
        offsets = [len(echoes[s.prompt_index]) for s in seqs]  # text_offset of each choice's next token
        with _ledger_guard(account, rid, seqs, totals):
            for s in seqs:
                if echoes[s.prompt_index]:
                    yield chunk([CompletionChoice(index=s.index, text=echoes[s.prompt_index])])
            async for d in self._run_metered(seqs, totals, account, rid):
                logprobs = None
                if req.logprobs is not None:
                    logprobs = self._completion_logprobs(d.logprobs, offsets[d.index])
                    offsets[d.index] += sum(len(t) for t in logprobs.tokens)
                if d.text or d.finish_reason or logprobs:
                    yield chunk([CompletionChoice(index=d.index, text=d.text, logprobs=logprobs,
                                                  finish_reason=d.finish_reason)])
            if req.include_usage:
                yield chunk([], _usage(seqs, totals, account))

    def _completion_prompts(self, prompt: str | list[str] | list[int] | list[list[int]]) -> list[list[int]]:
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise bad_request("prompt must not be empty", param="prompt")
        if isinstance(prompt[0], int):
            prompt = [prompt]
        prompts = [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompt]
        vocab = self.tokenizer.vocab_size
        for ids in prompts:
            if not ids:
                raise bad_request("prompt must contain at least one token", param="prompt")
            if any(not 0 <= t < vocab for t in ids):
                raise bad_request(f"prompt token ids must be in [0, {vocab})", param="prompt")
        return prompts

    def _completion_logprobs(self, logprobs: list[TokenLogprobs], offset: int) -> CompletionLogprobs:
        out = CompletionLogprobs()
        for lp in logprobs:
            token = self.tokenizer.decode([lp.chosen.token_id], skip_special_tokens=False)
            out.tokens.append(token)
            out.token_logprobs.append(lp.chosen.logprob)
            out.top_logprobs.append(
                {self.tokenizer.decode([t.token_id], skip_special_tokens=False): t.logprob for t in lp.top}
            )
            out.text_offset.append(offset)
            offset += len(token)
        return out

    # ------------------------------------------------------------------ shared

    def _check_model(self, model: str) -> None:
        if model != self.model_name:
            raise model_not_found(model)
        if not self.worker.is_alive:
            raise engine_unavailable(self.worker.dead_reason or "not running")

    def _sequences(
        self, req: SamplingFields, prompts: list[list[int]], max_tokens: int | None, prompt_param: str,
        grammar: str | None = None, session_id: str | None = None,
    ) -> list[SequenceSpec]:
        """`n` sequences per prompt, each with its own seed, checked against the context window."""
        seqs = []
        for p, prompt in enumerate(prompts):
            budget = self._max_tokens(len(prompt), max_tokens, prompt_param)
            for i in range(req.n):
                seed = None if req.seed is None else req.seed + i
                seqs.append(SequenceSpec(len(seqs), p, prompt, self._sampling(req, budget, seed, grammar),
                                         session_id))
        return seqs

    def _max_tokens(self, num_prompt_tokens: int, requested: int | None, prompt_param: str) -> int:
        limit = self.context_len
        if requested is None:
            if num_prompt_tokens >= limit:
                raise bad_request(
                    f"This model's maximum context length is {limit} tokens. However, your "
                    f"{prompt_param} resulted in {num_prompt_tokens} tokens, leaving no room for the "
                    f"completion. Please reduce the length of the {prompt_param}.",
                    param=prompt_param, code="context_length_exceeded",
                )
            return limit - num_prompt_tokens
        if num_prompt_tokens + requested > limit:
            raise bad_request(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{num_prompt_tokens + requested} tokens ({num_prompt_tokens} in the {prompt_param}, "
                f"{requested} in the completion). Please reduce the length of the {prompt_param} "
                f"or completion.",
                param=prompt_param, code="context_length_exceeded",
            )
        return requested

    def _sampling(self, req: SamplingFields, max_tokens: int, seed: int | None, grammar: str | None = None
                  ) -> SamplingParams:
        try:
            return SamplingParams(
                max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                seed=seed, stop=req.stop_strings, ignore_eos=req.ignore_eos, logprobs=req.num_logprobs,
                min_tokens=req.min_tokens, grammar=grammar,
            )
        except ValueError as e:
            raise bad_request(str(e)) from None

    async def _run_one(self, rid: str, seq: SequenceSpec, priority: int) -> AsyncIterator[Delta]:
        """Drive one engine sequence and turn its token ids into text deltas, applying stop strings."""
        stream = TextStream(self.tokenizer, seq.prompt_token_ids, seq.params.stop)
        outputs = self.worker.generate(f"{rid}-{seq.index}", seq.prompt_token_ids, seq.params, priority,
                                       session_id=seq.session_id)
        try:
            async for out in outputs:
                text, stop = stream.push(out.new_token_ids)
                finish = "stop" if stop is not None else out.finish_reason
                if finish is not None:
                    text += stream.finish()
                yield Delta(seq.index, text, out.new_token_ids, out.new_logprobs or [], finish,
                            out.num_cached_tokens)
                if finish is not None:
                    return  # leaving the engine's stream early (a stop string) aborts the sequence
        finally:
            await outputs.aclose()

    async def _run_metered(
        self, seqs: list[SequenceSpec], totals: list[ChoiceTotals], account: RequestAccount, rid: str
    ) -> AsyncIterator[Delta]:
        """Run the sequences at the tier's priority, adding each delta to `totals`. The usage is
        committed to the ledger just before the delta that finishes the last choice is handed on,
        so the client's final chunk never leaves before its ledger entry is durable."""
        num_finished = 0
        account.submitted(len(seqs), sum(len(s.prompt_token_ids) for s in seqs))
        async for d in _merge([self._run_one(rid, s, account.priority) for s in seqs]):
            totals[d.index].add(d)
            if d.token_ids:
                account.saw_tokens(len(d.token_ids))
            num_finished += d.finish_reason is not None
            if num_finished == len(seqs):
                await account.complete(rid, _token_usage(seqs, totals))
            yield d
        await account.complete(rid, _token_usage(seqs, totals))  # no-op once recorded

    async def _collect(
        self, seqs: list[SequenceSpec], account: RequestAccount, rid: str, is_disconnected: Disconnected | None = None
    ) -> list[ChoiceTotals]:
        """Run the sequences to the end for a full (non-streamed) response. A client that goes
        away meanwhile cancels the collection, which aborts its engine sequences."""
        totals = [ChoiceTotals(s.prompt_index) for s in seqs]
        with _ledger_guard(account, rid, seqs, totals):
            task = asyncio.ensure_future(self._gather(seqs, totals, account, rid))
            while is_disconnected is not None:
                done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                if done:
                    break
                if await is_disconnected():
                    await cancel_and_wait(task)
                    raise ClientDisconnected()
            return await task

    async def _gather(
        self, seqs: list[SequenceSpec], totals: list[ChoiceTotals], account: RequestAccount, rid: str
    ) -> list[ChoiceTotals]:
        try:
            async for _ in self._run_metered(seqs, totals, account, rid):
                pass
        except EngineDeadError as e:
            raise engine_unavailable(str(e)) from None
        except RequestRejectedError as e:
            raise bad_request(str(e)) from None
        return totals


def _call_out(call: ToolCall) -> ToolCallOut:
    return ToolCallOut(id=call.id, function=FunctionCall(name=call.name, arguments=call.arguments))


def _finish_reason(engine_reason: str | None, num_calls: int) -> str | None:
    """A reply that ends in tool calls finishes with `tool_calls` (a cut-off one stays `length`)."""
    return "tool_calls" if num_calls and engine_reason == "stop" else engine_reason


def _delta_message(event: Event) -> DeltaMessage:
    """A parser event as a stream delta: content text, or a piece of a tool call."""
    if isinstance(event, str):
        return DeltaMessage(content=event)
    return DeltaMessage(tool_calls=[ToolCallDelta(
        index=event.index, id=event.id, type="function" if event.id else None,
        function=FunctionCallDelta(name=event.name, arguments=event.arguments))])


def _token_usage(seqs: list[SequenceSpec], totals: list[ChoiceTotals]) -> TokenUsage:
    """Prompt tokens count once per prompt (its n choices share it), cached as the least any saw."""
    prompt_tokens, cached = {}, {}
    for s, t in zip(seqs, totals, strict=True):
        prompt_tokens[s.prompt_index] = len(s.prompt_token_ids)
        cached[s.prompt_index] = min(cached.get(s.prompt_index, t.num_cached_tokens), t.num_cached_tokens)
    return TokenUsage(sum(prompt_tokens.values()), sum(cached.values()), sum(t.num_tokens for t in totals))


@contextlib.contextmanager
def _ledger_guard(
    account: RequestAccount, rid: str, seqs: list[SequenceSpec], totals: list[ChoiceTotals]
) -> Iterator[None]:
    """A request that ends without being recorded as completed is recorded as aborted (its client
    left: a disconnect, a cancelled task, a closed stream) or failed (anything else)."""
    try:
        yield
    except (ClientDisconnected, asyncio.CancelledError, GeneratorExit):
        account.abandon(rid, _token_usage(seqs, totals), "aborted")
        raise
    except BaseException:
        account.abandon(rid, _token_usage(seqs, totals), "failed")
        raise


def _usage(seqs: list[SequenceSpec], totals: list[ChoiceTotals], account: RequestAccount | None = None) -> Usage:
    """The response's usage; with the request's `account`, the cost and energy its ledger entry recorded."""
    usage = _token_usage(seqs, totals)
    entry = account.entry if account is not None else None
    return Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=usage.cached_tokens),
        cost_usd=entry.cost_usd if entry is not None else None,
        energy_j=entry.energy_j if entry is not None else None,
    )


_DONE = object()


def _merge(streams: list[AsyncIterator[T]]) -> AsyncIterator[T]:
    """Interleave several async streams in arrival order; leaving early cancels all of them. One
    stream is handed on as it is: a layer less on every token's way out."""
    return streams[0] if len(streams) == 1 else _interleave(streams)


async def _interleave(streams: list[AsyncIterator[T]]) -> AsyncIterator[T]:
    queue: asyncio.Queue[Any] = asyncio.Queue()

    async def pump(stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                queue.put_nowait(item)
        except Exception as e:  # handed to the consumer, which raises it
            queue.put_nowait(e)
        finally:
            queue.put_nowait(_DONE)

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is _DONE:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()  # each pump's generator then aborts its engine sequence


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'), ensure_ascii=False)}\n\n"


def _model_event(model: BaseModel, exclude: set[str] | None = None) -> str:
    """A response model as one SSE event, serialised by pydantic-core straight to JSON text: the
    same JSON as `_event(model.model_dump())` in half the time, on every chunk's path."""
    return f"data: {model.model_dump_json(exclude=exclude)}\n\n"


def _json_response(model: BaseModel) -> Response:
    """A full response, serialised by pydantic-core (the JSON `JSONResponse(model.model_dump())` sends)."""
    return Response(model.model_dump_json(), media_type="application/json")


def _sse(events: AsyncIterator[str]) -> EventStream:
    """The SSE response of `events`, ended by `[DONE]`."""
    return EventStream(_with_done(events))


SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
               (b"x-accel-buffering", b"no")]


class EventStream:
    """A streamed SSE response as a plain ASGI app, cheap on the path to the first token.

    The events are iterated in the response's own task: the first step submits the request and
    waits for the engine, and only then, in a task of their own, do the headers go out, so no
    byte of the response leaves before the engine has the request, and the headers are written
    (and read by the client) while the engine computes the prompt, not after its first token.
    The client's disconnect is watched by one plain task (not a task group); a client that
    leaves cancels the response, and with it the events, which abort their engine sequences."""

    def __init__(self, events: AsyncIterator[str]) -> None:
        self.events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        left = False

        def on_disconnect(watch: asyncio.Future) -> None:
            nonlocal left
            if not watch.cancelled():
                left = True
                task.cancel()

        # Both start once this task first waits: on the engine, which then has the request.
        opening = asyncio.ensure_future(send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS}))
        watcher = asyncio.ensure_future(_disconnect(receive))
        watcher.add_done_callback(on_disconnect)
        try:
            async for event in self.events:
                if not opening.done():  # an event that came without a wait (an echoed prompt)
                    await opening
                await send({"type": "http.response.body", "body": event.encode(), "more_body": True})
            await opening
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not left:
                raise
            task.uncancel()  # the client left: the response ends here, quietly
        finally:
            opening.cancel()  # a no-op once the headers are out
            watcher.remove_done_callback(on_disconnect)
            watcher.cancel()
            await self.events.aclose()


async def _disconnect(receive: Receive) -> None:
    """Return once the client has gone (the request body was read before the response began)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _with_done(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """End every stream with `[DONE]`; an engine failure mid-stream becomes an SSE error event."""
    try:
        async for event in events:
            yield event
    except EngineDeadError as e:
        yield _event(engine_unavailable(str(e)).body())
    except RequestRejectedError as e:
        yield _event(bad_request(str(e)).body())
    except APIError as e:
        yield _event(e.body())
    yield "data: [DONE]\n\n"


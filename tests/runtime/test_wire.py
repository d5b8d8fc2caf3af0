"""Messages survive the trip between the gateway and the engine process unchanged."""

from __future__ import annotations

from tokenfactory.engine.outputs import EngineCoreOutput, Logprob, TokenLogprobs
from tokenfactory.engine.request import SamplingParams
from tokenfactory.runtime.wire import (
    Abort,
    AddRequest,
    EngineLoad,
    OutputBatch,
    Ready,
    Shutdown,
    encoder,
    from_engine_decoder,
    to_engine_decoder,
)


def test_requests_round_trip_with_their_sampling_params():
    params = SamplingParams(max_tokens=7, temperature=0.5, top_k=3, seed=9, stop=("\n", "END"), logprobs=2)
    for msg in (AddRequest("r1", [1, 2, 3], params, priority=2), Abort(["r1", "r2"]), Shutdown()):
        assert to_engine_decoder.decode(encoder.encode(msg)) == msg
    decoded = to_engine_decoder.decode(encoder.encode(AddRequest("r", [1], params)))
    assert decoded.sampling.stop == ("\n", "END") and isinstance(decoded.sampling, SamplingParams)


def test_a_step_is_one_message_with_all_outputs_and_the_load():
    lp = TokenLogprobs(Logprob(4, -0.1), [Logprob(4, -0.1), Logprob(9, -2.5)])
    batch = OutputBatch(
        outputs=[EngineCoreOutput("a", [4], [lp]), EngineCoreOutput("b", [7, 8], finish_reason="stop", stop_reason=8)],
        load=EngineLoad(num_running=1, num_free_blocks=10, num_total_blocks=12, num_steps=3),
        rejected={"c": "too long"},
    )
    assert from_engine_decoder.decode(encoder.encode(batch)) == batch
    ready = Ready(num_blocks=12, block_size=16, context_len=512, max_num_seqs=8, pid=1)
    assert from_engine_decoder.decode(encoder.encode(ready)) == ready

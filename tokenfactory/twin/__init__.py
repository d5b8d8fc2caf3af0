"""The digital twin: the engine's real scheduler and KV cache driven in simulated time by a
roofline cost model, replaying traces to plan a token factory (hardware, workers, routing)."""

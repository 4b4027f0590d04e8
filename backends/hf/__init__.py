"""The Hugging Face `transformers` engine (CPU, or CUDA when present).

One concept per module:
  engine.py      HFEngine: the Engine interface, step loop, operations
  scheduling.py  the HF engine's settings per PreemptionMode (who joins an iteration and
                 what it prefills is operations/batching.py, shared by every engine)
  forward.py     a resumable forward pass (layer / attention-MoE stages, prefill chunks)
                 and its KV view
  pass_log.py    what the engine measures of its passes: records, rates, cost model
  kv_cache.py    the paged KV pool, reservations, swap to host and back
  sequence.py    one request's state and lifecycle
  sampling.py    greedy / temperature / top-p, seeded per token
  weights.py     cold loads, warm host copies, measured load costs, device and host RAM
  tiny.py        tiny models with seeded random weights and a local tokenizer
  profile.py     measure an engine, fit the WorkerProfile the simulator reads
  cli.py         `qlm models build-tiny`, `qlm profile`, `qlm bench-engine`

Nothing heavy is imported here, so `qlm --help` stays fast.
"""

"""`n3 eval`: RULER, perplexity, throughput, MTP acceptance and lm-evaluation-harness, each against a checkpoint in
an in-process engine or any OpenAI-compatible endpoint (REFERENCE.md section 6).

    backend = engine_backend(checkpoint, cfg, print)      # stages.rollout.backend
    backend = EndpointBackend(url, tokenizer_path)        # stages.rollout.client
    run_ruler(backend, RulerOptions(lengths, samples))    # stages.eval.ruler
    perplexity(backend, text_tokens(backend, path))       # stages.eval.perplexity
    measure(backend, Shape(8192, 65536), concurrency, n)  # stages.eval.throughput
    acceptance(backend, prompts, max_tokens, source)      # stages.eval.mtp (in-process: the engine's counters)
    run_lm_eval(backend, tasks)                           # stages.eval.lm_eval_model (eval extra)
"""

"""Where a model answers for the stages that sample from it or score with it (eval, sft's accuracy tables, and the
RL and distillation stages): one Backend interface over an in-process engine (backend.EngineBackend) or any
OpenAI-compatible server (client.EndpointBackend)."""

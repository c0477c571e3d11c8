"""Where a model answers for the stages that sample from it or score with it (eval, sft's accuracy tables, and the
RL and distillation stages): one Backend interface over an in-process engine (backend.EngineBackend) or any
OpenAI-compatible server (client.EndpointBackend); and what policy-gradient stages share on top of it: scored groups
(groups), packed trajectories (batches), the policy losses (losses) and the learner (learner), the weights' way back
to the generator (weights), distillation teachers (teachers) and the bounded-staleness pipeline (pipeline)."""

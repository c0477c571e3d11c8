"""Chat data for the stages that fine-tune on conversations (sft, mopd's warmup, mtp-boost): rows in OpenAI form
(rows), where they come from (sources), their token ids and loss masks through the checkpoint's chat template (masks),
the reasoning modes of the training mix (reasoning), and best-fit packing into document-isolated rows (packing)."""

"""Chat data for the stages that fine-tune on conversations (sft, mopd's warmup, mtp-boost): rows in OpenAI form
(rows), where they come from (sources), their token ids and loss masks through the checkpoint's chat template (masks),
the reasoning modes of the training mix (reasoning), best-fit packing into document-isolated rows (packing), and the
whole way from sources to packed rows (data)."""

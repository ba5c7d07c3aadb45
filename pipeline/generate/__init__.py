"""Generate runs ([generate] in the job): decoder models write what they generate for each
document's prompt, with the attention of every decoding step.

prompts.py builds each prompt (template, chat template, segments); decode.py runs prefill and the
steps with the KV cache, capturing every layer through the same seam as a forward pass; steps.py
reduces a step's query rows (grounding features, head statistics, edges); run.py is a shard of
such a run, writing the tables.
"""

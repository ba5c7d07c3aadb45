"""Acting on attention during the forward pass: interventions before/after the softmax, and the
gradient driver (gradients.py and its neighbours); and measuring what an intervention did.

Interventions:

- spec.py     the rules of [[interventions]] and [effects], checked before any work
- keys.py     which keys of each window an intervention selects (positions, spans, regex, ...)
- edits.py    an intervention as a per-layer edit at the capture seam (bias before the softmax,
              patched probabilities after it)
- effects.py  how far the model's output moved: pooled-embedding cosine, next-token KL, logit
              differences
- run.py      one batch: its intervened passes against the unedited one, rows of `effects`
- generate.py generate runs: the prompts generated again with each intervention
- heads.py    the head scan: one intervention per head, through the job API

Nothing here is imported when a job has no interventions (spec.py needs no torch).
"""

"""Acting on attention during the forward pass: interventions before/after the softmax, and the gradient driver."""

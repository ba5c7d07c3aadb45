"""GPU tier: skipped without CUDA (CI has none). Capture on the GPU equals CPU eager."""

from __future__ import annotations

import pytest
import torch

from attnpipe.capture import capturing
from attnpipe.model import LoadedModel
from attnpipe.windows import collate, tokenize

from conftest import eager_attentions, tiny_model

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_cuda_capture_matches_cpu_eager(arch, tokenizer):
    model = tiny_model(arch)
    expected = eager_attentions(model, *collate(tokenize(tokenizer, ["A short one.", "A much longer sentence, "
                                                                     "with padding beside it."], 64, 8), 0))
    windows = tokenize(tokenizer, ["A short one.", "A much longer sentence, with padding beside it."], 64, 8)
    ids, mask = collate(windows, 0)
    lm = LoadedModel(model, tokenizer, arch, torch.device("cuda"))
    got = {}
    with capturing(lambda layer, probs: got.__setitem__(layer, probs.float().cpu())):
        lm.forward(ids.cuda(), mask.cuda())
    valid = (mask.bool()[:, None, :, None] & mask.bool()[:, None, None, :])
    for layer, ref in enumerate(expected):
        v = valid.expand_as(ref)
        torch.testing.assert_close(got[layer][v], ref[v], atol=1e-4, rtol=1e-4)  # TF32/kernels differ from CPU

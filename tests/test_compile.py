"""`torch.compile(model)`: the forward pass has no host syncs or data-dependent shapes on its main path, so
it is captured as one graph (eval) and compiles in training too (the sparse router backward may break it)."""

from __future__ import annotations

import pytest
import torch

import monet


@pytest.mark.slow
@pytest.mark.parametrize("decompose", ["vertical", "horizontal"])
def test_eval_forward_is_one_graph(decompose: str) -> None:
    torch.manual_seed(0)
    model = monet.MonetForCausalLM(monet.preset("tiny", moe_decompose=decompose)).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)   # fullgraph: any graph break fails
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False, output_router_probs=True)
        got = compiled(input_ids=ids, use_cache=False, output_router_probs=True)
    torch.testing.assert_close(got.logits, want.logits)
    torch.testing.assert_close(got.router_probs[0][0], want.router_probs[0][0])


@pytest.mark.slow
def test_training_step_compiles_and_matches_eager() -> None:
    torch.manual_seed(0)
    eager = monet.MonetForCausalLM(monet.preset("tiny")).train()
    compiled_model = monet.MonetForCausalLM(monet.preset("tiny")).train()
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, backend="aot_eager")
    ids = torch.randint(0, eager.config.vocab_size, (2, 12))
    loss_eager = eager(input_ids=ids, labels=ids).loss
    loss_compiled = compiled(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(loss_compiled, loss_eager)
    loss_eager.backward()
    loss_compiled.backward()
    for (name, a), b in zip(eager.named_parameters(), compiled_model.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, msg=name)

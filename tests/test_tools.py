"""Other people's tools on our checkpoints: transformers without `import monet`, lm-eval's command line,
nnsight and plain PyTorch forward hooks (docs/tools.md).

The client processes are real subprocesses whose own code never imports `monet`: only the
`modeling_monet_lm.py` shim that `save_pretrained` writes beside the weights does (`monet.remote_code`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from runs import train_run

import monet
from monet.checkpoint import latest_checkpoint, load_checkpoint
from monet.edits import ExpertEdits, edited
from monet.evaluate import write_lm_eval_task
from monet.interp.capture import active_experts, capture_routing
from monet.interp.hooks import expert_contribution, forced_routing
from monet.remote_code import AUTO_MAP, SHIM_FILE

FAST = {"preset": "tiny", "batch_size": 4, "seq_len": 32, "warmup_steps": 2, "eval_interval": 0,
        "save_interval": 4, "max_steps": 4, "num_hidden_layers": 4}
TEXT = "def main():\n    return os.path.join(a, b)"


@pytest.fixture(scope="module")
def checkpoint(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained tiny run (4 layers, 2 routing groups of 2 layers) and its checkpoint directory."""
    run = tmp_path_factory.mktemp("tools") / "run"
    train_run(corpus, run, FAST)
    return latest_checkpoint(run)


def client_env(tmp: Path) -> dict[str, str]:
    """Environment of a client process: offline, caches under tmp, and the `monet` of this test session
    importable (it is what the shim imports; the client's own code does not)."""
    src = str(Path(monet.__file__).resolve().parents[1])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_MODULES_CACHE": str(tmp / "hf-modules"), "HF_DATASETS_CACHE": str(tmp / "hf-datasets"),
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    return env


def run_client(code: str, tmp: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=client_env(tmp), timeout=timeout)


# ----------------------------------------------------------------------------------------------------------
# 1. Loading from any client


def test_checkpoint_carries_the_shim(checkpoint: Path) -> None:
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP and config["architectures"] == ["MonetForCausalLM"]
    shim = (checkpoint / SHIM_FILE).read_text()
    assert "from monet.model import MonetForCausalLM" in shim and "class " not in shim   # imports, no model code
    manifest = json.loads((checkpoint / "checkpoint.json").read_text())
    assert SHIM_FILE in manifest["files"]   # covered by the size/SHA-256 check like the weights


def test_resaving_a_remote_code_model_writes_the_shim_not_copies(checkpoint: Path, tmp_path: Path) -> None:
    """transformers marks classes loaded through remote code for `custom_object_save`, which would copy
    monet/model.py and monet/config.py beside the weights; our save writes the shim instead."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True)
    type(model)._auto_class, type(model.config)._auto_class = "AutoModelForCausalLM", "AutoConfig"
    try:
        model.save_pretrained(tmp_path / "again")
    finally:
        type(model)._auto_class = type(model.config)._auto_class = None
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", SHIM_FILE]
    assert AutoConfig.from_pretrained(tmp_path / "again").auto_map == AUTO_MAP
    assert model.config.auto_map == AUTO_MAP   # the in-memory config is left as it was loaded


@pytest.mark.slow
def test_auto_model_loads_in_a_process_that_never_imports_monet(checkpoint: Path, tmp_path: Path) -> None:
    model, tokenizer = load_checkpoint(checkpoint)
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model(ids).logits
    torch.save(ids, tmp_path / "ids.pt")
    result = run_client(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        assert not any(m == "monet" or m.startswith("monet.") for m in sys.modules)
        path = {str(checkpoint)!r}
        try:
            AutoModelForCausalLM.from_pretrained(path)
            raise SystemExit("loaded without trust_remote_code: the shim was not the way in")
        except ValueError as exc:
            assert "trust_remote_code" in str(exc), exc
        sys.modules["monet"] = None   # as if monet-lm were not installed: the shim says what to install
        try:
            AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
            raise SystemExit("loaded without the monet package")
        except ImportError as exc:
            assert "pip install monet-lm" in str(exc), exc
        del sys.modules["monet"]
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
        assert type(model).__module__ == "monet.model", type(model)
        ids = torch.load({str(tmp_path / "ids.pt")!r})
        assert tokenizer({TEXT!r}, return_tensors="pt").input_ids.equal(ids)
        with torch.no_grad():
            torch.save(model(ids).logits, {str(tmp_path / "logits.pt")!r})
        model.generate(ids, max_new_tokens=4, do_sample=False)
    """, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.allclose(torch.load(tmp_path / "logits.pt"), expected, atol=1e-5)   # thread counts differ


def test_lm_eval_sees_a_causal_lm() -> None:
    """lm-eval's HF backend decides "causal" from transformers' name table, not from registered classes."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    assert MODEL_FOR_CAUSAL_LM_MAPPING_NAMES["monet"] == "MonetForCausalLM"


def lm_eval_command() -> list[str]:
    script = Path(sys.executable).with_name("lm_eval")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "lm_eval"]


@pytest.mark.slow
def test_lm_eval_command_line_on_a_trained_run(checkpoint: Path, corpus: Path, tmp_path: Path) -> None:
    """`lm_eval --model hf --model_args pretrained=CKPT,trust_remote_code=True` in a subprocess, offline, on
    a local task; its log-likelihoods equal the ones our model computes for the same token spans."""
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness not installed (pip install 'monet-lm[eval]')")
    pytest.importorskip("accelerate", reason="lm-eval's HF backend needs accelerate (pip install 'monet-lm[eval]')")
    task_dir = write_lm_eval_task(corpus, tmp_path / "task", split="train", num_items=4, context_tokens=16,
                                  continuation_tokens=6)
    command = [*lm_eval_command(), "--model", "hf", "--model_args",
               f"pretrained={checkpoint},trust_remote_code=True,dtype=float32", "--tasks", "monet_continuation",
               "--include_path", str(task_dir), "--device", "cpu", "--batch_size", "8",
               "--output_path", str(tmp_path / "out"), "--log_samples"]
    result = subprocess.run(command, capture_output=True, text=True, env=client_env(tmp_path), timeout=300,
                            cwd=tmp_path)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "neither marked as CausalLM" not in log and "Model type cannot be determined" not in log
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    accuracy = results["results"]["monet_continuation"]["acc,none"]
    samples = [json.loads(line) for line in next((tmp_path / "out").rglob("samples_*.jsonl")).open()]
    assert len(samples) == 4 and 0.0 <= accuracy <= 1.0

    model, tokenizer = load_checkpoint(checkpoint)
    correct = 0
    for sample in samples:
        doc = sample["doc"]
        ours = [continuation_loglikelihood(model, tokenizer, doc["context"], choice) for choice in doc["choices"]]
        theirs = [float(resp[0][0]) for resp in sample["resps"]]
        assert theirs == pytest.approx(ours, abs=1e-4)
        correct += int(max(range(len(ours)), key=ours.__getitem__) == doc["gold"])
    assert accuracy == pytest.approx(correct / len(samples))


@torch.no_grad()
def continuation_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context) as lm-eval tokenizes it: encode context + continuation (trailing
    spaces of the context moved to the continuation); the continuation's tokens are those of the whole text
    after as many tokens as the context alone has, and the model reads the context's own tokens before them
    (which differ from the whole text's when a token straddles the boundary)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    context_ids = tokenizer.encode(context)
    ids = context_ids + tokenizer.encode(context + continuation)[len(context_ids):]
    logits = model(torch.tensor([ids[:-1]])).logits.log_softmax(-1)[0]
    return float(sum(logits[t - 1, ids[t]] for t in range(len(context_ids), len(ids))))


# ----------------------------------------------------------------------------------------------------------
# 2. nnsight and forward hooks


@pytest.fixture(scope="module")
def nn_model(checkpoint: Path):
    nnsight = pytest.importorskip("nnsight", reason="nnsight not installed (pip install 'monet-lm[interp]')")
    return nnsight.TransformersModel(str(checkpoint), task="text-generation", trust_remote_code=True, dispatch=True)


@pytest.fixture(scope="module")
def ours(checkpoint: Path):
    return load_checkpoint(checkpoint)


@pytest.mark.slow
def test_nnsight_loads_the_checkpoint_path_without_import_monet(checkpoint: Path, tmp_path: Path) -> None:
    """`nnsight.TransformersModel(path, trust_remote_code=True)` (and the older `LanguageModel`) in a fresh
    process: the routing it reads equals what our capture records on the same model."""
    pytest.importorskip("nnsight", reason="nnsight not installed (pip install 'monet-lm[interp]')")
    result = run_client(f"""
        import sys, warnings, torch, nnsight
        assert not any(m == "monet" or m.startswith("monet.") for m in sys.modules)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # LanguageModel is deprecated in nnsight 0.8, still works
            old = nnsight.LanguageModel({str(checkpoint)!r}, trust_remote_code=True, dispatch=True)
        lm = nnsight.TransformersModel({str(checkpoint)!r}, task="text-generation", trust_remote_code=True,
                                       dispatch=True)
        with lm.trace({TEXT!r}):
            g1, g2 = lm.model.layers[0].router.output
            g1, g2 = g1.save(), g2.save()
        from monet.interp.capture import capture_routing   # after loading: only for the comparison
        ids = lm.tokenizer({TEXT!r}, return_tensors="pt").input_ids
        with torch.no_grad(), capture_routing(lm._module) as capture:
            lm._module(ids)
        assert torch.equal(capture.groups[0][0], g1) and torch.equal(capture.groups[0][1], g2)
        print("ok", type(old._module).__name__)
    """, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-2:] == ["ok", "MonetForCausalLM"]


def test_nnsight_reads_routing_expert_outputs_and_residual_stream(nn_model, ours) -> None:
    model, tokenizer = ours
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    with nn_model.trace(TEXT):   # read in the order the forward pass computes them
        x0 = nn_model.model.layers[0].post_attention_layernorm.output.save()
        g0 = nn_model.model.layers[0].router.output.save()
        moe0 = nn_model.model.layers[0].moe.output.save()
        resid0 = nn_model.model.layers[0].output[0].save()
        resid1 = nn_model.model.layers[1].output[0].save()
        g1 = nn_model.model.layers[2].router.output.save()
        resid2 = nn_model.model.layers[2].output[0].save()
        logits = nn_model.output.logits.save()
    g, resid = [g0, g1], [resid0, resid1, resid2]
    with torch.no_grad(), capture_routing(model) as capture:
        out = model(ids, output_hidden_states=True)
    for group in (0, 1):
        assert torch.equal(g[group][0], capture.groups[group][0]) and torch.equal(g[group][1], capture.groups[group][1])
        theirs, mine = active_experts(*g[group]), capture.experts(group)
        assert all(torch.equal(a, b) for a, b in zip(theirs.entries(), mine.entries(), strict=True))
    for layer in range(3):
        assert torch.allclose(resid[layer], out.hidden_states[layer + 1], atol=1e-6)
    assert torch.allclose(logits, out.logits, atol=1e-5)
    # The expert layer's output is the score-weighted sum of its active experts' outputs (eq. 7/14).
    active = active_experts(*g[0]).expert_ids.unique()   # one sequence: every token's experts
    every_active = expert_contribution(model.model.layers[0].moe, x0, *g[0], active.tolist())
    assert torch.allclose(moe0, every_active, atol=1e-5)


def test_nnsight_ablation_at_the_expert_output_equals_our_edit(nn_model, ours) -> None:
    """Deleting expert (group 1, id) = subtracting its contribution from the expert output of both layers
    of the group; scaling it by alpha (steering) = adding (alpha - 1) x its contribution."""
    model, tokenizer = ours
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    with capture_routing(model) as capture, torch.no_grad():
        model(ids)
    expert = capture.experts(1).token(0, 5)[0][0]   # the top expert of token 5 in group 1
    for alpha in (0.0, 4.0):
        with nn_model.trace(TEXT):
            for layer in (2, 3):                       # the layers of routing group 1
                moe = nn_model.model.layers[layer].moe
                x, g1, g2 = moe.inputs[0]              # the expert layer's input and its group's routing
                moe.output = moe.output + (alpha - 1.0) * expert_contribution(moe, x, g1, g2, [expert])
            logits = nn_model.output.logits.save()
        with torch.no_grad(), edited(model, ExpertEdits().scale(1, expert, alpha)):
            expected = model(ids).logits
        with torch.no_grad():
            plain = model(ids).logits
        assert not torch.allclose(expected, plain, atol=1e-4)   # the edit does change the output
        assert torch.allclose(logits, expected, atol=1e-5)


def test_overwriting_routing_with_nnsight_and_with_a_forward_hook(nn_model, ours) -> None:
    """Routing every token of group 0 to expert (i, j) (a valid routing: each head sums to 1) makes each
    layer's expert output H x E_ij(x); a plain PyTorch forward hook on the router does the same."""
    model, tokenizer = ours
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    i, j, heads = 3, 5, model.config.moe_heads
    with nn_model.trace(TEXT):
        g1, g2 = nn_model.model.layers[0].router.output
        g1, g2 = g1.save(), g2.save()
        nn_model.model.layers[0].router.output = (forced_routing(g1, i), forced_routing(g2, j))
        x0 = nn_model.model.layers[0].moe.inputs[0][0].save()
        moe0 = nn_model.model.layers[0].moe.output.save()
        x1 = nn_model.model.layers[1].moe.inputs[0][0].save()
        moe1 = nn_model.model.layers[1].moe.output.save()
        logits = nn_model.output.logits.save()
    x, moe = [x0, x1], [moe0, moe1]
    expert = i * model.config.moe_experts + j
    for layer in (0, 1):
        alone = expert_contribution(model.model.layers[layer].moe, x[layer], forced_routing(g1, i),
                                    forced_routing(g2, j), [expert])
        assert torch.allclose(moe[layer], alone, atol=1e-5)
        assert torch.allclose(alone, heads * monet.model.expert_output(model.model.layers[layer].moe, x[layer], i, j),
                              atol=1e-5)
    handle = model.model.layers[0].router.register_forward_hook(
        lambda module, args, output: (forced_routing(output[0], i), forced_routing(output[1], j)))
    try:
        with torch.no_grad():
            hooked = model(ids).logits
    finally:
        handle.remove()
    assert torch.allclose(logits, hooked, atol=1e-5)


def test_zeroing_routing_entries_is_not_deleting_experts(nn_model, ours) -> None:
    """Why ablation goes through the expert OUTPUT: the factored sums use that each head's g1 and g2 sum to
    1, so zeroing a bottom half's g1 entries computes neither the model with those experts deleted ..."""
    model, tokenizer = ours
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    with capture_routing(model) as capture, torch.no_grad():
        model(ids)
    half = int(capture.groups[0][0][0, 5].sum(0).argmax())   # the bottom half most used by token 5
    with nn_model.trace(TEXT):
        g1, g2 = nn_model.model.layers[0].router.output
        zeroed = g1.clone()
        zeroed[..., half] = 0
        nn_model.model.layers[0].router.output = (zeroed, g2)
        logits = nn_model.output.logits.save()
    with torch.no_grad(), edited(model, ExpertEdits().scale_bottom(0, half, 0.0)):
        deleted = model(ids).logits
    assert not torch.allclose(logits, deleted, atol=1e-3)
    # ... while subtracting the half's experts from the expert outputs does (every pair (half, j)).
    experts = [half * model.config.moe_experts + j for j in range(model.config.moe_experts)]
    with nn_model.trace(TEXT):
        for layer in (0, 1):
            moe = nn_model.model.layers[layer].moe
            x, g1, g2 = moe.inputs[0]
            moe.output = moe.output - expert_contribution(moe, x, g1, g2, experts)
        subtracted = nn_model.output.logits.save()
    assert torch.allclose(subtracted, deleted, atol=1e-5)


def test_nnsight_sees_our_edits(nn_model, ours) -> None:
    """Edits applied with our API live in the model's modules, so an nnsight trace runs the edited model."""
    model, tokenizer = ours
    with capture_routing(model) as capture, torch.no_grad():
        model(tokenizer(TEXT, return_tensors="pt").input_ids)
    expert = capture.experts(0).token(0, 3)[0][0]
    with nn_model.trace(TEXT):
        plain = nn_model.output.logits.save()
    with edited(nn_model._module, ExpertEdits().delete(0, [expert])):
        with nn_model.trace(TEXT):
            masked = nn_model.output.logits.save()
        with torch.no_grad(), edited(model, ExpertEdits().delete(0, [expert])):
            expected = model(tokenizer(TEXT, return_tensors="pt").input_ids).logits
    assert torch.allclose(masked, expected, atol=1e-5) and not torch.allclose(masked, plain, atol=1e-4)


@pytest.mark.slow
def test_docs_tools_examples_run(checkpoint: Path, tmp_path: Path) -> None:
    """Every ```python block of docs/tools.md, in order, as one script in a fresh process (on our checkpoint)."""
    pytest.importorskip("nnsight", reason="nnsight not installed (pip install 'monet-lm[interp]')")
    text = (Path(__file__).parents[1] / "docs" / "tools.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    assert len(blocks) >= 6 and blocks[0].startswith("path = ")
    script = "\n".join(blocks).replace(blocks[0].splitlines()[0], f"path = {str(checkpoint)!r}", 1)
    result = run_client(script, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
